import pickle
import random

import jericho
import pytest

from priorzero_core.config import GameConfig
from priorzero_core.games import make_env
from priorzero_core.games.jericho_env import world_state_hash


@pytest.fixture
def zork(rom_dir):
    env = make_env(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0))
    yield env
    env.close()


def test_zork1_walkthrough_reaches_350_with_exact_rewards(zork):
    ts = zork.reset()
    total = 0.0
    for action in zork.walkthrough():
        ts = zork.advance(action)  # skips the valid-action search, which the replay does not need
        total += ts.reward
    assert ts.score == 350 == zork.max_score and total == 350
    assert ts.won and ts.done and not ts.truncated


def test_start_observation_has_response_look_and_inventory_and_valid_actions(zork):
    ts = zork.reset()
    assert ts.observation.count("West of House") == 2 and "empty-handed" in ts.observation
    assert {"open mailbox", "north", "south", "west"} <= set(ts.valid_actions)
    moves = ts.info["game_moves"]
    ts = zork.step("open mailbox")
    assert ts.info["game_moves"] == moves + 1  # look and inventory did not advance the game
    assert "leaflet" in ts.raw and "take leaflet" in ts.valid_actions and ts.moves == 1


def test_save_restore_round_trips_observation_score_and_hash(zork):
    zork.reset()
    for action in ("north", "east", "open window", "enter house"):
        zork.step(action)
    saved = pickle.loads(pickle.dumps(zork.get_state()))
    before = zork.last
    for action in ("take all", "west", "take lamp"):
        after = zork.step(action)
    assert after.score != before.score or after.state_hash != before.state_hash
    zork.set_state(saved)
    assert zork.last == before
    replayed = zork.step("take all")
    zork.set_state(saved)
    again = zork.step("take all")
    assert (again.observation, again.score, again.reward, again.state_hash, again.moves) == (
        replayed.observation, replayed.score, replayed.reward, replayed.state_hash, replayed.moves)


def test_episode_is_truncated_at_max_episode_steps(rom_dir):
    env = make_env(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0, max_episode_steps=2))
    try:
        env.reset()
        assert not env.step("north").done
        ts = env.step("south")
        assert ts.done and ts.truncated and ts.info["truncated_reason"] == "max_episode_steps"
    finally:
        env.close()


def test_fast_world_state_hash_tells_apart_exactly_the_states_jericho_does(rom_dir):
    env = jericho.FrotzEnv(str(rom_dir / "zork1.z5"))
    env.reset()
    rng = random.Random(0)
    pairs = set()
    for action in env.get_walkthrough()[:40]:
        state = env.get_state()
        for extra in rng.sample(["north", "south", "east", "west", "take all", "drop all", "open door"], 3):
            env.step(extra)
            pairs.add((env.get_world_state_hash(), world_state_hash(env)))
            env.set_state(state)
        env.step(action)
        pairs.add((env.get_world_state_hash(), world_state_hash(env)))
    ours = {fast for _, fast in pairs}
    theirs = {slow for slow, _ in pairs}
    assert len(pairs) == len(ours) == len(theirs) > 60


# A trajectory an earlier Zork 1 run's Go-Explore archive imitated (44 points on its own seed): it puts the lantern
# down and walks on in the dark, where a grue may or may not strike, depending on the game's seed.
LUCKY = ["south", "south", "go around trees", "up", "take egg", "throw egg at nest", "down", "south", "east",
         "open window", "west", "take bottle", "west", "push rug", "take lantern", "put down bottle", "take bottle",
         "open case", "open bottle", "east", "close window", "west", "throw bottle at lantern", "close case",
         "open trap door", "take lantern", "down", "put down lantern", "put down bottle", "south", "east",
         "take painting"]


def test_seed_replays_tell_a_lucky_trajectory(rom_dir):
    from priorzero_core.games.jericho_env import SeedReplayer

    replayer = SeedReplayer(rom_dir / "zork1.z5", list(range(30_000, 30_010)))
    try:
        scores = replayer.scores(LUCKY)
        assert scores == replayer.scores(LUCKY)  # each seed replays the same way
        assert set(scores) == {44.0, 30.0}  # the painting on some seeds, eaten in the dark (-10) on the others
        assert replayer.scores(["north", "north", "up", "take egg"]) == [5.0] * 10  # no random event on the way
    finally:
        replayer.close()


def test_seed_replays_judge_a_trajectory_one_move_past_its_end(zork, rom_dir):
    from priorzero_core.games.jericho_env import SeedReplayer

    # the egg, the window and the cellar without the lamp: 40 points, then the dark, where a grue takes most moves
    dark = ["north", "north", "up", "take egg", "down", "south", "east", "open window", "west", "west", "push rug",
            "open trap door", "down"]
    zork.reset()
    for action in dark[:-1]:
        zork.advance(action)
    probes = zork.step(dark[-1]).valid_actions
    replayer = SeedReplayer(rom_dir / "zork1.z5", list(range(30_000, 30_008)))
    try:
        outcomes = replayer.outcomes(dark, probes)
        assert outcomes == replayer.outcomes(dark, probes)
        assert min(safe for _, safe in outcomes) < 1  # some move from the end dies on some seed
        for held, safe in outcomes:  # each death there costs its 10 points; no other move loses any
            assert held == pytest.approx(40 - 10 * (1 - safe))
        assert replayer.outcomes(dark) == [(40.0, 1.0)] * 8  # without probes: the score, and safe
        eaten = [(held, safe) for held, safe in replayer.outcomes(LUCKY, probes) if held == 30.0]
        assert eaten and all(safe == 0.0 for _, safe in eaten)  # the game ended on the way: its score there
    finally:
        replayer.close()

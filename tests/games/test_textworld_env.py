import multiprocessing as mp
import time

import pytest

from priorzero_core.config import GameConfig
from priorzero_core.games import EnvPool, make_env
from priorzero_core.games.textworld_env import embedded_game


@pytest.fixture(scope="module")
def embedded():
    env = make_env(GameConfig())
    yield env
    env.close()


def test_embedded_walkthrough_reaches_max_score_through_the_env_interface(embedded):
    ts = embedded.reset()
    assert embedded.max_score >= 3 and ts.score == 0
    total = 0.0
    for action in embedded.walkthrough():
        assert action in ts.valid_actions
        ts = embedded.step(action)
        total += ts.reward
    assert ts.score == total == embedded.max_score and ts.won and ts.done


def test_valid_actions_leave_out_commands_that_only_show_something(embedded):
    """As Jericho's valid actions are the commands that change the world: no look, inventory or examine."""
    ts = embedded.reset()
    admissible = embedded._env.reset()["admissible_commands"]
    assert any(c.startswith("examine ") for c in admissible) and "look" in admissible
    assert ts.valid_actions and not any(c.split()[0] in {"look", "inventory", "examine"} for c in ts.valid_actions)
    assert set(ts.valid_actions) < set(admissible)


def test_observation_is_response_look_and_inventory(embedded):
    ts = embedded.reset()
    assert "-= Bedroom =-" in ts.observation and "carrying nothing" in ts.observation
    assert ts.raw.startswith("It's time to explore")  # no ASCII-art title
    assert not ts.raw.endswith("0/1")  # nor TextWorld's status bar
    assert len(ts.valid_actions) <= embedded.spec.action_space_size


def test_state_is_restored_by_replaying_the_history(embedded):
    embedded.reset()
    walk = embedded.walkthrough()
    for action in walk[:4]:
        embedded.step(action)
    saved, before = embedded.get_state(), embedded.last
    for action in walk[4:7]:
        embedded.step(action)
    embedded.set_state(saved)
    assert embedded.last == before
    assert embedded.step(walk[4]).state_hash != before.state_hash


def test_the_embedded_game_needs_no_rom_and_pools_step_it(monkeypatch):
    monkeypatch.delenv("PRIORZERO_ROM_DIR", raising=False)
    pool = EnvPool(GameConfig(), 2, seed=0)
    try:
        first = pool.reset_all()
        action = pool.envs[0].walkthrough()[0]
        stepped = pool.step([action, None])
        assert stepped[0].reward == 1 and stepped[1] == first[1]
    finally:
        pool.close()


def _generate(cache_dir, seed, queue):
    queue.put(embedded_game(seed, cache_dir).path.read_bytes())


def test_concurrent_generation_is_safe_and_the_second_use_is_instant(tmp_path):
    ctx = mp.get_context("fork")  # no re-import in the children: only the generation is timed by the test run
    queue = ctx.Queue()
    procs = [ctx.Process(target=_generate, args=(tmp_path, 7, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == ["embedded-tw-simple-v1-seed7"]  # no temp folders left
    t0 = time.monotonic()
    game = embedded_game(7, tmp_path)
    assert time.monotonic() - t0 < 0.1 and game.path.read_bytes() == results[0]

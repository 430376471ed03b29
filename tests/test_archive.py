"""Go-Explore's archive, its demonstrations, and collection that returns to archived states."""

import numpy as np
import pytest

from priorzero_core.agent import Agent
from priorzero_core.archive import (Archive, Trace, demo_segment, robust_best, shorten, trace_steps,
                                    without_loops)
from priorzero_core.collector import Collector
from priorzero_core.config import ExploreConfig, load_config
from priorzero_core.games import EnvPool, game_spec
from priorzero_core.ppo.env_state import state_bytes, state_from_bytes
from priorzero_core.replay import GameSegment, ReplayBuffer, StepRecord


def record(action: str, reward: float = 0.0, index: int = 0) -> StepRecord:
    valid = ["north", "south", "take lamp"]
    return StepRecord(f"at {action}", valid, index, valid[index], reward, 0, [1 / 3] * 3, 0.0)


def trace_of(*steps: StepRecord) -> Trace:
    trace = None
    for step in steps:
        trace = Trace.extend(trace, step)
    return trace


def test_a_cell_keeps_the_shortest_trajectory_and_snapshots_only_what_it_keeps():
    archive = Archive(ExploreConfig(), np.random.default_rng(0))
    snapshots = []

    def snap(tag):
        return lambda: snapshots.append(tag) or tag

    long = trace_of(record("a"), record("b"), record("c"))
    assert archive.visit("room|5", 5, long, snap("long"))
    assert not archive.visit("room|5", 5, trace_of(record("a"), record("b"), record("c"), record("d")), snap("longer"))
    assert archive.visit("room|5", 5, trace_of(record("x")), snap("short"))
    cell = archive.cells["room|5"]
    assert snapshots == ["long", "short"] and cell.state == "short" and cell.length == 1
    assert cell.times_seen == 3 and archive.updates == 2


def test_best_is_the_highest_score_then_the_shortest_way_and_choice_favours_rarely_chosen_cells():
    archive = Archive(ExploreConfig(frontier_share=0.0), np.random.default_rng(0))
    archive.visit("start", 0, None, lambda: "s0")
    archive.visit("a|10", 10, trace_of(record("a"), record("b")), lambda: "s1")
    archive.visit("b|10", 10, trace_of(record("c")), lambda: "s2")
    assert archive.best().key == "b|10"
    archive.cells["start"].times_chosen = 99  # chosen often already: its weight falls
    draws = [archive.choose().key for _ in range(200)]
    assert draws.count("start") < draws.count("a|10") and draws.count("start") < draws.count("b|10")


def test_frontier_share_of_returns_go_to_the_cells_at_the_best_score():
    archive = Archive(ExploreConfig(frontier_share=0.5), np.random.default_rng(0))
    for k in range(8):
        archive.visit(f"low{k}", 0, trace_of(record("a")), lambda: "low")
    archive.visit("top", 5, trace_of(record("b")), lambda: "top")
    draws = [archive.choose().key for _ in range(400)]
    assert 0.42 < draws.count("top") / 400 < 0.65  # half the returns, and some of the rest
    archive.cfg = ExploreConfig(frontier_share=1.0)
    assert {archive.choose().key for _ in range(20)} == {"top"}


def test_frontier_levels_share_the_frontier_by_score_not_by_how_many_cells_a_score_has():
    """Many cells at the best score (a dead end that keeps making new cells) and one a level below: with
    frontier_levels 2, the one below gets half of the frontier's returns, not 1/41 of them."""
    archive = Archive(ExploreConfig(frontier_share=1.0, frontier_levels=2), np.random.default_rng(0))
    for k in range(40):
        archive.visit(f"dark{k}", 44, trace_of(record("a")), lambda: "dark")
    archive.visit("lit", 40, trace_of(record("b")), lambda: "lit")
    archive.visit("start", 0, None, lambda: "start")
    draws = [archive.choose().key for _ in range(400)]
    assert 0.4 < draws.count("lit") / 400 < 0.6 and "start" not in draws
    archive.cfg = ExploreConfig(frontier_share=1.0)  # one level: the best score's cells only
    assert "lit" not in {archive.choose().key for _ in range(100)}


def test_archive_round_trips_through_its_file_with_shared_trajectory_prefixes(tmp_path):
    archive = Archive(ExploreConfig(), np.random.default_rng(0))
    prefix = trace_of(record("a", 1.0), record("b"))
    archive.visit("start", 0, None, lambda: ("start",))
    archive.visit("p", 1, prefix, lambda: ("p", np.arange(3)))
    archive.visit("q", 1, Trace.extend(prefix, record("c", 5.0, index=2)), lambda: ("q",))
    archive.cells["q"].times_chosen = 4
    archive.save(tmp_path, state_bytes)
    lines = __import__("gzip").open(tmp_path / "archive.jsonl.gz", "rt").read().splitlines()
    assert sum('"node"' in line for line in lines) == 3  # the shared prefix is written once

    loaded = Archive(ExploreConfig(), np.random.default_rng(0))
    loaded.load(tmp_path, state_from_bytes)
    assert set(loaded.cells) == {"start", "p", "q"}
    q = loaded.cells["q"]
    assert [s.action for s in trace_steps(q.trace)] == ["north", "north", "take lamp"]
    assert q.trace.parent is loaded.cells["p"].trace and q.times_chosen == 4 and q.state == ("q",)
    np.testing.assert_array_equal(loaded.cells["p"].state[1], np.arange(3))
    assert loaded.cells["start"].trace is None


def test_an_unreadable_archive_is_a_one_line_checkpoint_error(tmp_path):
    from priorzero_core.errors import CheckpointError

    (tmp_path / "archive.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(CheckpointError, match="archive .* is unreadable"):
        Archive(ExploreConfig(), np.random.default_rng(0)).load(tmp_path, state_from_bytes)


def test_demonstration_targets_the_action_taken_and_values_the_return_to_come():
    archive = Archive(ExploreConfig(), np.random.default_rng(0))
    steps = [record("a", 0.0, 0), record("b", 10.0, 2), record("c", 0.0, 1), record("d", 5.0, 0)]
    archive.visit("end", 15, trace_of(*steps), lambda: "end")
    demo = demo_segment(archive.best(), discount=0.5)
    assert [s.policy_target for s in demo.steps] == [[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]
    assert [s.visit_dist for s in demo.steps] == [s.policy_target for s in demo.steps]
    assert [s.truncated for s in demo.steps] == [False, False, False, True]
    assert steps[0].policy_target is None  # the collected records themselves are untouched
    buf = ReplayBuffer(100, discount=0.5, n_step=2)
    buf.add([GameSegment("e", 0, 0, [record("z")])])
    buf.set_demos([demo])
    returns = [0 + 0.5 * 10 + 0.25 * 0 + 0.125 * 5, 10 + 0.5 * 0 + 0.25 * 5, 0 + 0.5 * 5, 5]
    assert [buf.value_target(demo, t) for t in range(4)] == pytest.approx(returns)  # n-step targets are exact


def test_a_smoothed_demonstration_spreads_its_share_over_the_valid_actions():
    archive = Archive(ExploreConfig(), np.random.default_rng(0))
    archive.visit("end", 10, trace_of(record("a", 0.0, 2), record("b", 10.0, 0)), lambda: "end")
    demo = demo_segment(archive.best(), discount=0.5, smoothing=0.3)
    assert [s.policy_target for s in demo.steps] == [pytest.approx([0.1, 0.1, 0.8]), pytest.approx([0.8, 0.1, 0.1])]
    assert [s.visit_dist for s in demo.steps] == [s.policy_target for s in demo.steps]
    assert [s.root_value for s in demo.steps] == [5.0, 10.0]  # values are the returns, whatever the smoothing
    with pytest.raises(ValueError, match=r"demo smoothing must lie in \[0, 1\), got 1"):
        demo_segment(archive.best(), discount=0.5, smoothing=1)


def test_a_demonstration_leaves_out_detours_back_to_a_state_it_passed_through():
    from dataclasses import replace

    def at(state: str, action: str, score: int, reward: float = 0.0) -> StepRecord:
        return replace(record(action, reward), action=action, state_hash=state, score=score)

    steps = [at("A", "open box", 0), at("B", "close box", 0),  # back to A
             at("A", "west", 0), at("W", "east", 0),  # back to A again
             at("A", "north", 10, 10.0), at("N", "drop coin", 5, -5.0), at("N2", "take coin", 10, 5.0),  # N, same score
             at("N", "up", 10), at("U", "down", 10),  # back to N at 10: cut
             at("N", "east", 15, 5.0)]
    kept = without_loops(steps)
    assert [s.action for s in kept] == ["north", "east"]
    assert sum(s.reward for s in kept) == sum(s.reward for s in steps) and kept[-1].score == 15
    # the state N at score 10 after "north" and N at 5 after "drop coin" differ: a detour must end at the same score
    assert [s.action for s in without_loops(steps[4:6] + [at("N", "up", 5)])] == ["north", "drop coin", "up"]
    assert [s.observation for s in without_loops([record("a"), record("b"), record("a")])] == ["at a", "at b", "at a"]  # no hashes
    archive = Archive(ExploreConfig(), np.random.default_rng(0))
    archive.visit("end", 15, trace_of(*steps), lambda: "end")
    assert len(demo_segment(archive.best(), 0.9).steps) == 10
    demo = demo_segment(archive.best(), 0.9, cut_loops=True)
    assert [s.action for s in demo.steps] == ["north", "east"] and demo.steps[-1].truncated
    assert demo.steps[0].root_value == pytest.approx(10 + 0.9 * 5)


def test_sample_draws_the_demo_fraction_of_a_batch_from_demonstrations():
    buf = ReplayBuffer(100, discount=0.9, n_step=1)
    buf.add([GameSegment("e", 0, 0, [record("z") for _ in range(20)])])
    demo = GameSegment("demo-x", 0, 0, [record("d") for _ in range(3)])
    assert all(s.steps[0].observation == "at z" for s in buf.sample(8, 2, 0, demo_fraction=0.5))  # no demos set yet
    buf.set_demos([demo])
    batch = buf.sample(8, 2, 0, demo_fraction=0.25)
    assert [s.steps[0].observation for s in batch].count("at d") == 2
    assert len(buf) == 20  # demonstrations are not replay steps
    buf.set_demos([])
    assert "demo-x" not in buf._episodes


@pytest.fixture
def embedded_collector():
    cfg = load_config("debug", ["llm.enabled=false", "collect.num_envs=2", "world_model.embed_dim=32", "game.max_episode_steps=5",
                                "world_model.num_heads=2", "mcts.num_simulations=2"])
    from priorzero_core.text_encoder import TextEncoder
    from priorzero_core.world_model import WorldModel

    spec = game_spec(cfg.game)
    rng = np.random.default_rng(0)
    encoder = TextEncoder()
    agent = Agent(cfg, spec, encoder, WorldModel(cfg.world_model, encoder.dim), None, rng, __import__("torch").device("cpu"))
    pool = EnvPool(cfg.game, 2)
    explore = ExploreConfig(from_start=0.0, steps=3)
    archive = Archive(explore, rng)
    yield Collector(pool, agent, segment_length=50, epsilon=0.0, rng=rng, archive=archive, explore=explore), archive
    pool.close()


def test_collection_returns_to_archived_states_with_their_history_and_explores_a_bounded_number_of_steps(
        embedded_collector):
    collector, archive = embedded_collector
    segments, stats = collector.collect(12)
    assert len(archive) >= 2 and stats.returns_to_cells > 0
    restored = [s for s in segments if s.start_step > 0 and s.index == 0]
    assert restored, "some episodes start from archived states"
    for seg in restored:
        assert len(seg.steps) <= 3
        if len(seg.steps) == 3:
            assert seg.steps[-1].truncated  # the exploration budget ends it; no bootstrap past it
    # Every archived trajectory replays from the start to its cell's state.
    pool = collector.pool
    for cell in list(archive.cells.values())[:5]:
        ts = pool.reset([0])[0]
        for step in trace_steps(cell.trace):
            assert step.observation == ts.observation and step.state_hash == ts.state_hash
            ts = pool.step([step.action], indices=[0])[0]
        assert pool.cell_key(0) == cell.key and cell.length == len(trace_steps(cell.trace))


def test_restored_episode_shows_the_agent_the_trajectory_that_reached_the_cell(embedded_collector):
    collector, archive = embedded_collector
    collector.collect(7)  # the first episodes end at their 5th step; the next ones return to cells
    assert any(r.steps_left is not None for r in collector._running)
    for r in collector._running:
        expected = [(s.observation, s.action, s.reward) for s in trace_steps(r.trace)]
        assert r.view.history == expected


def test_jericho_cells_tell_places_loads_and_what_can_be_done_apart(rom_dir):
    from priorzero_core.config import GameConfig
    from priorzero_core.games import make_env

    env = make_env(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0))
    try:
        env.reset()
        start = env.cell_key()
        assert start == env.cell_key() and start.startswith("0|")
        saved = env.get_state()
        env.step("open mailbox")  # same place, same load, another set of things to do
        opened = env.cell_key()
        env.step("take leaflet")
        carrying = env.cell_key()
        env.set_state(saved)
        env.step("north")
        assert len({start, opened, carrying, env.cell_key()}) == 4
    finally:
        env.close()


def test_after_a_return_exploration_tries_actions_from_the_llm_prior_or_uniformly(embedded_collector):
    from priorzero_core.agent import Decision, EnvView

    collector, _ = embedded_collector
    uniform = np.full(3, 1 / 3)
    d = Decision(["a", "b", "c"], 0, "a", uniform, uniform, 0.0, np.log([0.001, 0.998, 0.001]), None)
    view = EnvView([], None)
    assert [collector._explore_action(d, view) for _ in range(50)].count(1) >= 45
    d.llm_prior = None  # the collector's agent has no LLM: uniform
    assert {collector._explore_action(d, view) for _ in range(100)} == {0, 1, 2}

    tried = []
    collector._explore_action = lambda d, view: tried.append(d) or 0
    collector.explore = collector.explore.model_copy(update={"epsilon": 1.0})
    collector.collect(9)
    # Both envs start at the start (the archive is empty) and play 5 steps to the episode's end; every later
    # episode returns to a cell (from_start 0), so the last 4 steps of each env are tries.
    assert len(tried) == 2 * (9 - 5)


def test_without_an_archive_or_with_from_start_1_every_episode_starts_at_the_start(embedded_collector):
    collector, archive = embedded_collector
    collector.explore = collector.explore.model_copy(update={"from_start": 1.0})
    segments, stats = collector.collect(12)
    assert len(archive) > 0 and stats.returns_to_cells == 0
    assert all(s.start_step == 0 for s in segments if s.index == 0)
    collector.archive, collector._running = None, []
    segments, stats = collector.collect(12)
    assert stats.returns_to_cells == 0 and all(r.trace is None for r in collector._running)


def test_candidates_come_from_the_best_score_down_shortest_first_a_quarter_per_score():
    archive = Archive(ExploreConfig(), np.random.default_rng(0))
    for k in range(5):
        archive.visit(f"top{k}", 10, trace_of(*[record("a")] * (k + 1)), lambda: "s")
        archive.visit(f"mid{k}", 5, trace_of(*[record("b")] * (k + 1)), lambda: "s")
    archive.visit("low", 0, None, lambda: "s")
    assert [c.key for c in archive.candidates(8)] == ["top0", "top1", "mid0", "mid1", "low"]
    assert [c.key for c in archive.candidates(1)] == ["top0"]


def test_the_robust_best_holds_on_other_seeds_and_each_trajectory_is_replayed_once():
    archive = Archive(ExploreConfig(), np.random.default_rng(0))
    archive.visit("lucky|44", 44, trace_of(record("a")), lambda: "s")  # shortest, highest, but often eaten
    archive.visit("safe|40", 40, trace_of(record("b"), record("c")), lambda: "s")
    archive.visit("also|40", 40, trace_of(record("b"), record("c"), record("d")), lambda: "s")
    archive.visit("trap|40", 40, trace_of(record("f"), record("g"), record("h")), lambda: "s")
    # (mean score over seeds, share of moves from the end that keep the game going)
    held = {"lucky|44": (34.0, 1.0), "safe|40": (40.0, 1.0), "also|40": (40.0, 1.0), "trap|40": (40.0, 0.5)}
    calls, cache = [], {}

    def scores(cell):
        calls.append(cell.key)
        return held[cell.key]

    best, value = robust_best(archive.candidates(16), scores, cache)
    assert (best.key, value) == ("safe|40", (40.0, 1.0))  # ties go to the safer end, then the shorter trajectory
    robust_best(archive.candidates(16), scores, cache)
    assert sorted(calls) == sorted(held)  # the second choice came from the cache
    archive.visit("safe|40", 40, trace_of(record("e")), lambda: "s")  # a shorter way: replayed anew
    robust_best(archive.candidates(16), scores, cache)
    assert calls.count("safe|40") == 2
    held["safe|40"] = held["also|40"] = (40.0, 0.25)
    assert robust_best(archive.candidates(16), lambda c: held[c.key], {})[0].key == "trap|40"


def test_shorten_leaves_out_a_detour_that_only_several_moves_undo():
    def scores(actions):
        """One seed: a point for digging where the walk started."""
        place = 0
        for a in actions:
            place += {"east": 1, "west": -1}.get(a, 0)
            if a == "dig":
                return [int(place == 0)]
        return [0]

    moves = ["east", "east", "west", "west", "dig"]
    assert shorten(moves, scores) == (moves, [1])  # no single move can go: each leaves the walk off its start
    assert shorten(moves, scores, span=2) == (["dig"], [1])  # "east, west" goes whole, then the other pair


def test_shorten_leaves_out_each_move_the_score_needs_under_no_seed_and_keeps_the_rest():
    needed = ["key", "door", "gold"]

    def scores(actions):
        """Two seeds: points for needed moves in order; seed 1 also needs "lamp" before "gold", seed 0 does not."""
        out = []
        for seed in (0, 1):
            score, k, lit = 0, 0, False
            for a in actions:
                lit |= a == "lamp"
                if k < len(needed) and a == needed[k] and (a != "gold" or lit or seed == 0):
                    score, k = score + 1, k + 1
            out.append(score)
        return out

    calls = []

    def counted(actions):
        calls.append(list(actions))
        return scores(actions)

    moves = ["wait", "key", "look", "lamp", "door", "jump", "gold", "key", "wait"]
    short, held = shorten(moves, counted)

    assert short == ["key", "lamp", "door", "gold"]  # the lamp holds on seed 1 only: kept
    assert held == scores(short) == scores(moves) == [3, 3]
    assert len(calls) <= 1 + 2 * len(moves)  # a pass that leaves nothing out ends it
    assert shorten([], scores) == ([], [0, 0])

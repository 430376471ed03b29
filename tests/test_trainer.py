"""The core iteration driven by a plain Python loop (no Prefect, no MLflow)."""

import json
import threading
import time

import numpy as np
import pytest

from priorzero_core import checkpoint as ckpt
from priorzero_core.config import load_config
from priorzero_core.errors import CheckpointError, ConfigError, StageStopped
from priorzero_core.replay import ReplayBuffer
from priorzero_core.trainer import Trainer, read_metrics, run_plain
from measures import wall_clock

TINY = [
    "collect.num_envs=2",
    "collect.steps_per_iteration=3",
    "eval.num_episodes=1",
    "eval.max_episode_steps=3",
    "eval.eval_freq=2",
    "world_model.batch_size=4",
    "world_model.unroll_steps=2",
    "world_model.embed_dim=32",
    "world_model.num_heads=2",
    "mcts.num_simulations=2",
    "schedule.replay_ratio=0.5",
    "explore.random_steps=0",  # zork.yaml's search-free exploration: only where a test asks for it
]


def test_plain_loop_trains_checkpoints_and_resumes_where_it_stopped(tmp_path):
    cfg = load_config("debug", TINY + ["llm.enabled=false", "schedule.iterations=3"])
    history = run_plain(cfg, tmp_path, iterations=2, progress=False)
    assert [row["iteration"] for row in history] == [1, 2]
    first = history[0]
    assert first["collect/env_steps"] == 6 and "evals/reward_mean" in first and "evals/wm/reward_mean" in first
    assert first["train/wm_total_loss"] != 0 and first["train/wm_updates"] == 3
    path, manifest = ckpt.latest_valid(tmp_path / "checkpoints")
    assert manifest["meta"]["iteration"] == 2 and manifest["meta"]["env_steps"] == 12

    resumed = run_plain(cfg, tmp_path, resume=True, progress=False)
    assert [row["iteration"] for row in resumed] == [3]
    assert resumed[0]["collect/total_env_steps"] == 18
    assert resumed[0]["replay/steps"] == 18  # every step collected so far, reloaded from run_dir/replay
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    assert "iteration 3 checkpoint" in (tmp_path / "logs" / "train.log").read_text()


def test_the_world_model_s_td_lambda_is_the_replay_s(tmp_path):
    trainer = Trainer(load_config("debug", TINY + ["llm.enabled=false", "world_model.td_lambda=0.7"]), tmp_path,
                      progress=False)
    try:
        assert trainer.replay.td_lambda == 0.7
    finally:
        trainer.close()


def test_a_jericho_run_logs_what_the_valid_action_cache_saved(tmp_path, rom_dir):
    cfg = load_config("zork", TINY + ["llm.enabled=false", f"game.rom_dir={rom_dir}", "game.valid_action_workers=1"])
    first = run_plain(cfg, tmp_path, iterations=1, progress=False)[0]
    # Both envs start in the same state: one of the first two requests is a hit, and later ones may be.
    assert 1 / 8 <= first["collect/valid_actions_cache_hit_rate"] < 1
    assert first["collect/valid_actions_s"] > 0


def test_a_jericho_run_imitates_the_trajectory_that_holds_on_other_game_seeds(tmp_path, rom_dir):
    from dataclasses import replace

    import jericho

    from priorzero_core.archive import Trace
    from priorzero_core.replay import StepRecord
    from games.test_jericho_env import LUCKY

    def trace(actions):
        node = None
        for a in actions:
            node = Trace.extend(node, StepRecord("", [a], 0, a, 0.0, 0, [1.0], 0.0))
        return node

    # the walkthrough's first 26 moves: 40 points, down the trap door with the lamp lit, on every seed
    lit = jericho.FrotzEnv(str(rom_dir / "zork1.z5")).get_walkthrough()[:26]
    cfg = load_config("zork", TINY + ["llm.enabled=false", f"game.rom_dir={rom_dir}", "game.valid_action_workers=1"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        trainer.archive.visit("lucky", 44, trace(LUCKY), lambda: None)  # 44 on its own seed, often eaten elsewhere
        trainer.archive.visit("lit", 40, trace(lit), lambda: None)
        chosen, value = trainer._demo_cell()
        assert chosen.key == "lit" and value == 40.0
        # what is replayed is what the learners imitate: with explore.demo_cut_loops, the moves without the
        # detours back to a state passed through. Here the hashes say the walk came back to where it started
        # before climbing, so the cut trajectory skips the walk to the tree (its climb and the egg then fail):
        # the window's 10 on every seed, not 15.
        walk = trace(lit[:9])  # N, N, U, get egg, D, S, E, open window, W: 15 points
        steps = walk.steps()
        looped = None
        for step, state in zip(steps, ["start", "path", "start", "tree", "d", "e", "f", "g", "h"]):
            looped = Trace.extend(looped, replace(step, state_hash=state))
        trainer.archive.cells.clear()
        trainer.archive.visit("window", 15, looped, lambda: None)
        chosen, value = trainer._demo_cell()
        assert chosen.key == "window" and value == 10.0
        trainer._replayer = None  # explore.demo_seeds=0: the archive's best score
        trainer.archive.visit("lucky", 44, trace(LUCKY), lambda: None)
        assert trainer._demo_cell()[0].key == "lucky"
    finally:
        trainer.close()


@pytest.mark.parametrize("end_check", [True, False])
def test_a_jericho_run_imitates_a_trajectory_whose_end_is_safe_with_the_moves_that_make_it_so(end_check, tmp_path,
                                                                                              rom_dir):
    from priorzero_core.archive import Trace
    from priorzero_core.config import GameConfig
    from priorzero_core.games import make_env
    from priorzero_core.replay import StepRecord

    # Zork 1's egg, window and cellar: 40 points on every seed either way, but without the lamp the cellar is dark
    # and a grue takes most moves from there
    start = ["north", "north", "up", "take egg", "down", "south", "east", "open window", "west", "west"]
    dark = start + ["push rug", "open trap door", "down"]
    lit = start + ["take lantern", "push rug", "open trap door", "turn on lantern", "down"]
    env = make_env(GameConfig(name="zork1", rom_dir=str(rom_dir), valid_action_workers=0))
    cfg = load_config("zork", TINY + ["llm.enabled=false", f"game.rom_dir={rom_dir}", "game.valid_action_workers=1",
                                      f"explore.demo_end_check={str(end_check).lower()}"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        for key, actions in (("dark", dark), ("lit", lit)):
            env.reset()
            node = None
            for a in actions:
                node = Trace.extend(node, StepRecord("", [a], 0, a, 0.0, 0, [1.0], 0.0))
                ts = env.step(a)
            assert ts.score == 40 and not ts.done
            trainer.archive.visit(key, 40, node, env.get_state)
        chosen, value = trainer._demo_cell()
        trainer._refresh_demo()
        imitated = [s.action for s in trainer.replay.demos[0].steps]
        if end_check:
            assert chosen.key == "lit" and value == 40.0  # no move from its end loses points on any seed
            assert {"take lantern", "turn on lantern"} <= set(imitated)  # shortening keeps them: its end stays safe
        else:  # both hold 40: the shorter, whose end most moves die from
            assert chosen.key == "dark" and value == 40.0
            assert "take lantern" not in imitated
    finally:
        trainer.close()
        env.close()


def test_a_shortened_move_that_is_no_valid_action_gets_the_move_left_out_before_it_back(tmp_path, rom_dir):
    from priorzero_core.archive import Trace
    from priorzero_core.config import GameConfig
    from priorzero_core.games import make_env
    from priorzero_core.replay import StepRecord

    # detective, 70 points in 19 moves of an earlier run's imitated trajectory. Shortened, it takes the note with the
    # paper still in hand, where the game's valid-action detection does not find "take note"
    moves = ["take paper", "north", "west", "east", "put paper down", "north", "south", "west", "take note", "east",
             "east", "take wood", "put note down", "north", "west", "north", "north", "west", "north"]
    env = make_env(GameConfig(name="detective", rom_dir=str(rom_dir), valid_action_workers=0))
    cfg = load_config("detective", TINY + ["llm.enabled=false", f"game.rom_dir={rom_dir}",
                                           "game.valid_action_workers=1"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        env.reset()
        node = None
        for a in moves:
            node = Trace.extend(node, StepRecord("", [a], 0, a, 0.0, 0, [1.0], 0.0))
            ts = env.step(a)
        trainer.archive.visit("paper", ts.score, node, env.get_state)
        trainer._refresh_demo()
        steps = trainer.replay.demos[0].steps
        imitated = [s.action for s in steps]
        assert len(imitated) < len(moves) and imitated.index("put paper down") < imitated.index("take note")
        assert all(s.valid_actions[s.action_index] == s.action for s in steps)
        assert steps[-1].score == ts.score == trainer._demo_value == 70
    finally:
        trainer.close()
        env.close()


@pytest.mark.parametrize("shorten", [True, False])
def test_a_jericho_run_imitates_its_trajectory_without_the_moves_the_score_does_not_need(shorten, tmp_path, rom_dir):
    from priorzero_core.archive import Trace
    from priorzero_core.replay import StepRecord

    node = None
    moves = ["open mailbox", "take leaflet", "north", "east", "drop leaflet", "open window", "west"]  # the kitchen: 10
    for a in moves:
        node = Trace.extend(node, StepRecord("", [a], 0, a, 0.0, 0, [1.0], 0.0))
    cfg = load_config("zork", TINY + ["llm.enabled=false", f"game.rom_dir={rom_dir}", "game.valid_action_workers=1",
                                      f"explore.demo_shorten={str(shorten).lower()}"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        trainer.archive.visit("kitchen", 10, node, lambda: None)
        trainer._refresh_demo()
        (demo,) = trainer.replay.demos
        steps = demo.steps
        if not shorten:
            assert [s.action for s in steps] == moves
            return
        assert [s.action for s in steps] == ["north", "east", "open window", "west"]
        assert trainer._demo_value == 10.0
        # recorded where it was played (the first replay seed), as the learners see it: each move among its
        # state's valid actions, the observation before it, the reward it earned; the trajectory's end is cut
        assert all(s.valid_actions[s.action_index] == s.action and s.policy_target[s.action_index] == 1.0
                   for s in steps)
        assert "West of House" in steps[0].observation and "Behind House" in steps[2].observation
        assert [s.reward for s in steps] == [0, 0, 0, 10] and steps[-1].score == 10 and steps[-1].truncated
        assert steps[0].root_value == pytest.approx(10 * cfg.world_model.discount ** 3)
        trainer._refresh_demo()  # the same cell: not shortened or recorded again
        assert trainer.replay.demos[0] is demo
    finally:
        trainer.close()


def test_a_failed_ppo_stage_goes_on_from_what_its_actors_kept_and_checkpoints_carry_it(tmp_path):
    cfg = load_config("debug", TINY + ["llm.enabled=false", "run.keep_checkpoints=1"])
    trainer = Trainer(cfg, tmp_path, progress=False)

    class Actors:
        """Stands in for the Ray actors of a PPO stage that failed: `alive` says whether they still answer."""

        def __init__(self, alive):
            self.alive, self.closed = alive, False

        def rescue(self, directory):
            if self.alive:
                directory.mkdir(parents=True)
                (directory / "critic").write_text("trained critic")
            return self.alive

        def close(self):
            self.closed = True

    def fail_with(actors):
        trainer._ppo = actors
        with pytest.raises(RuntimeError):
            with trainer._restart_ppo_on_failure():
                raise RuntimeError("a PPO actor failed")
        assert actors.closed and trainer._ppo is None

    try:
        fail_with(Actors(alive=True))
        assert (trainer._ppo_resume_dir / "critic").read_text() == "trained critic"
        for it in (1, 2):  # keep_checkpoints=1: the first checkpoint is pruned by the second
            trainer.checkpoint(it)
        assert trainer._ppo_resume_dir == tmp_path / "checkpoints" / "iter-000002" / "ppo"
        assert (trainer._ppo_resume_dir / "critic").read_text() == "trained critic"
        fail_with(Actors(alive=False))  # nothing answers: the newest checkpoint's PPO state
        assert trainer._ppo_resume_dir == tmp_path / "checkpoints" / "iter-000002" / "ppo"
    finally:
        trainer.close()


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = load_config("debug", TINY + ["llm.enabled=false"])
    run_plain(cfg, tmp_path, iterations=1, progress=False)
    other = load_config("debug", TINY + ["llm.enabled=false", "world_model.embed_dim=64"])
    with pytest.raises(CheckpointError, match="made with another config"):
        Trainer(other, tmp_path, resume=True, progress=False)
    assert ckpt.latest_valid(tmp_path / "checkpoints") is not None  # untouched


def test_unwritable_run_dir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # root ignores permission bits, so block with a file instead
    cfg = load_config("debug", TINY + ["llm.enabled=false"])
    with pytest.raises(ConfigError, match=r"run directory .*file/run is not writable"):
        Trainer(cfg, blocker / "run", progress=False)
    assert blocker.read_text() == "not a directory"


def test_schedule_modes():
    cfg = load_config("debug", TINY + ["llm.enabled=false"])
    trainer = Trainer.__new__(Trainer)  # due() reads only the config, the LLM trainer and the time budget's end
    trainer.cfg, trainer.llm_trainer, trainer._final = cfg, object(), None
    cfg.schedule.llm_train_freq = 2
    cfg.schedule.mode = "alternating"
    assert [trainer.due("train_world_model", i) for i in (1, 2, 3, 4)] == [True, False, True, False]
    assert [trainer.due("train_llm", i) for i in (1, 2, 3, 4)] == [False, True, False, True]
    cfg.schedule.mode = "sequential"
    assert [trainer.due("train_world_model", i) for i in (1, 2)] == [True, True]
    assert trainer.due("evaluate", 1) and not trainer.due("evaluate", 2) and trainer.due("evaluate", 3)


@pytest.mark.slow
def test_llm_prior_is_used_for_search_and_trained_from_it(tmp_path):
    cfg = load_config("debug", TINY + ["schedule.llm_train_freq=1", "llm.batch_size=2", "llm.updates_per_train=2",
                                        "llm.max_prompt_tokens=192", "llm.history_length=1", "eval.modes=[wm_llm,llm]"])
    history = run_plain(cfg, tmp_path, iterations=1, progress=False)
    row = history[0]
    assert row["train/llm_sft_loss"] > 0 and "train/llm_rft_loss" in row
    assert "evals/wm_llm/reward_mean" in row and "evals/llm/reward_mean" in row
    segs = [s for p in (tmp_path / "replay").glob("*.jsonl.gz") for s in ReplayBuffer.read_segments(p)]
    step = segs[0].steps[0]
    assert step.prompt and step.llm_prior is not None and len(step.llm_prior) == len(step.valid_actions)
    assert (tmp_path / "checkpoints" / "iter-000001" / "llm").is_dir()


def test_time_budget_ends_training_with_an_evaluated_and_checkpointed_iteration(tmp_path):
    cfg = load_config("debug", TINY + ["llm.enabled=false", "schedule.iterations=50", "eval.eval_freq=10",
                                       "run.checkpoint_freq=10", "schedule.time_budget_s=0.001",
                                       "eval.modes=[wm,random]"])
    history = run_plain(cfg, tmp_path, progress=False)
    assert [row["iteration"] for row in history] == [1, 2]  # 1 always runs; 2 ends past the budget
    assert "evals/random/reward_mean" in history[0] and "evals/reward_mean" in history[1]
    assert history[1]["evals/reward_mean"] == history[1]["evals/wm/reward_mean"]  # the first mode is the main one
    _, manifest = ckpt.latest_valid(tmp_path / "checkpoints")
    assert manifest["meta"]["iteration"] == 2


def test_world_model_trains_each_sampled_step_on_the_history_search_gives_it(tmp_path):
    """The first steps of a sampled sequence see their real history in the training windows, exactly as a search
    root with that history does (a window cut at the sample's start would see none)."""
    import torch

    from priorzero_core.agent import sequences_to_wm_batch

    cfg = load_config("debug", TINY + ["llm.enabled=false", "collect.steps_per_iteration=6", "world_model.context_length=3",
                                       "world_model.reanalyse=true", "world_model.n_step=2"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        trainer.collect(1)
        C = cfg.world_model.context_length
        segs = list(trainer.replay.segments)
        seqs = [trainer.replay.sequence(seg, t, 2, C - 1) for seg in segs for t in (0, 1, 3)]
        assert {len(s.context) for s in seqs} == {0, 1, 2}
        batch = sequences_to_wm_batch(seqs, trainer.encoder, trainer.spec.action_space_size, trainer.device, history=C - 1)
        model = trainer.wm.model.eval()
        torch.nn.init.normal_(model.value_head[-1].weight)  # zero at init: it would hide a mismatch
        with torch.no_grad():
            first = batch.known.to(torch.int8).argmax(-1)
            value_logits = model(batch.obs_emb, batch.act_emb, batch.valid_emb, batch.valid_mask, first)[0]
        from priorzero_core.world_model import support_to_scalar

        trained = support_to_scalar(value_logits[:, C - 1], cfg.world_model.support_size).numpy()
        searched = trainer.agent.values(seqs)
        np.testing.assert_allclose(trained, searched, atol=1e-4)
        assert batch.step_mask[:, : C - 1].sum() == 0 and batch.known[:, : C - 1].any()
        drawn = trainer.wm_batch()  # what training draws: history positions first, filled where the episode has them
        assert drawn.known.shape[1] == C - 1 + cfg.world_model.unroll_steps + 1 and drawn.known[:, : C - 1].any()
        # world_model.reanalyse: a target's bootstrap position counts the history positions too
        assert drawn.bootstrap_pos is not None and (drawn.bootstrap_pos >= 0).any()
        rseqs = [trainer.replay.sequence(seg, t, 4, C - 1, reanalyse=True) for seg in segs for t in (0, 1)]
        rbatch = sequences_to_wm_batch(rseqs, trainer.encoder, trainer.spec.action_space_size, trainer.device,
                                       history=C - 1)
        expected = [[-1] * (C - 1) + [C - 1 + i + o if o >= 0 else -1 for i, o in enumerate(s.bootstrap_offset)]
                    for s in rseqs]
        assert rbatch.bootstrap_pos.tolist() == expected and any(o >= 0 for row in expected for o in row)
    finally:
        trainer.close()


def test_the_archive_and_its_demonstration_are_checkpointed_and_resumed(tmp_path):
    cfg = load_config("debug", TINY + ["llm.enabled=false", "game.max_episode_steps=4", "explore.from_start=0.5"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        for it in (1, 2, 3):
            trainer.collect(it)
        trainer.checkpoint(3)
        cells = {key: (cell.score, cell.length) for key, cell in trainer.archive.cells.items()}
        demo = trainer._demo
    finally:
        trainer.close()
    assert len(cells) > 3
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    try:
        assert {key: (c.score, c.length) for key, c in resumed.archive.cells.items()} == cells
        assert resumed._demo == demo
        assert (demo is None) == (not resumed.replay.demos)
    finally:
        resumed.close()
    off = load_config("debug", TINY + ["llm.enabled=false", "explore.enabled=false"])
    plain = Trainer(off, tmp_path / "off", progress=False)
    try:
        assert plain.archive is None and plain.collector.archive is None
    finally:
        plain.close()


@pytest.mark.parametrize("smoothing", [0.0, 0.4])
def test_the_imitated_trajectory_s_targets_take_explore_demo_smoothing(tmp_path, smoothing):
    from test_archive import record, trace_of

    cfg = load_config("debug", TINY + ["llm.enabled=false", f"explore.demo_smoothing={smoothing}"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        trainer.archive.visit("won", 5, trace_of(record("a", 0.0, 1), record("b", 5.0, 2)), lambda: "won")
        trainer._refresh_demo()
        (demo,) = trainer.replay.demos
        third = smoothing / 3
        assert [s.policy_target for s in demo.steps] == [
            pytest.approx([third, 1 - smoothing + third, third]), pytest.approx([third, third, 1 - smoothing + third])]
    finally:
        trainer.close()


@pytest.mark.parametrize("switch", ["best", "better"])
def test_explore_demo_switch_better_keeps_the_imitated_trajectory_until_one_imitates_fewer_moves(tmp_path, switch):
    """A shorter way to the same score whose imitated moves (loops cut) are no fewer does not replace the imitated
    trajectory under `better` (it does under `best`); one with fewer does; a resume imitates what was imitated."""
    from dataclasses import replace

    from test_archive import record, trace_of

    def at(state: str, action: str, score: int, reward: float = 0.0):
        return replace(record(action, reward), action=action, state_hash=state, score=score)

    cfg = load_config("debug", TINY + ["llm.enabled=false", f"explore.demo_switch={switch}",
                                       "explore.demo_cut_loops=true"])
    looped = trace_of(at("A", "open box", 0), at("B", "close box", 0), at("A", "north", 0),
                      at("N", "east", 5, 5.0))  # 4 steps, 2 imitated: the box is a detour back to A
    straight = trace_of(at("A", "west", 0), at("W", "up", 0), at("U", "east", 5, 5.0))  # 3 steps, 3 imitated
    shortest = trace_of(at("A", "south", 5, 5.0))  # 1 step
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        trainer.archive.visit("won-1", 5, looped, lambda: "s1")
        trainer._refresh_demo()
        assert [s.action for s in trainer.replay.demos[0].steps] == ["north", "east"]
        trainer.archive.visit("won-2", 5, straight, lambda: "s2")  # now the archive's best: 3 steps < 4
        trainer._refresh_demo()
        kept = [s.action for s in trainer.replay.demos[0].steps]
        assert kept == (["north", "east"] if switch == "better" else ["west", "up", "east"])
        trainer.checkpoint(1)
    finally:
        trainer.close()
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    try:
        assert [s.action for s in resumed.replay.demos[0].steps] == kept
        resumed.archive.visit("won-3", 5, shortest, lambda: "s3")
        resumed._refresh_demo()
        assert [s.action for s in resumed.replay.demos[0].steps] == ["south"]  # fewer moves: imitated either way
    finally:
        resumed.close()


def test_search_free_exploration_grows_the_archive_but_not_the_replay(tmp_path):
    """explore.random_steps: envs of their own return to archived cells and try uniform actions after each
    collection; the archive (and the run's step count) keep what they found, the replay only the searched steps,
    the run's loss counts both."""
    cfg = load_config("debug", TINY + ["llm.enabled=false", "game.max_episode_steps=6", "explore.random_steps=60",
                                       "explore.random_envs=3"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        metrics = [trainer.collect(it).metrics for it in (1, 2)]
        assert len(trainer.replay) == 12  # 2 envs x 3 steps, twice: the searched steps alone
        assert [m["explore/random_steps"] for m in metrics] == [60, 60]  # 3 envs x 20 steps
        assert metrics[1]["explore/total_random_steps"] == 120 and trainer.explorer.collector._running == []
        searched = {id(step) for seg in trainer.replay.segments for step in seg.steps}
        found = [c for c in trainer.archive.cells.values() if c.trace is not None and id(c.trace.step) not in searched]
        assert found  # cells reached by the search-free steps alone
        cells = len(trainer.archive)
        # every real step, searched or not, is counted (under two keys: eval.avoid_known_losses)
        assert sum(tries for tries, _ in trainer.losses.counts.values()) == 2 * (12 + 120)
        losses = dict(trainer.losses.counts)
        trainer.checkpoint(2)
    finally:
        trainer.close()
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    try:
        assert resumed.random_steps == 120 and len(resumed.archive) == cells
        assert resumed.losses.counts == losses
    finally:
        resumed.close()


def test_search_free_exploration_shares_the_collection_pool_s_valid_action_workers(tmp_path, rom_dir):
    cfg = load_config("zork", TINY + ["llm.enabled=false", f"game.rom_dir={rom_dir}", "game.valid_action_workers=1",
                                      "explore.random_steps=4", "explore.random_envs=2", "explore.demo_seeds=0"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        assert trainer.explorer.pool.valid_actions is trainer.collect_pool.valid_actions
        metrics = trainer.collect(1).metrics
        assert metrics["explore/random_steps"] == 4 and len(trainer.replay) == 6
        trainer.explorer.close()  # leaves the shared workers running for the collection pool
        trainer.explorer = None
        assert all(ts.valid_actions for ts in trainer.collect_pool.step(["look", "look"]))
    finally:
        trainer.close()


def test_a_world_model_stage_retried_after_failing_part_way_does_the_updates_it_still_owes(tmp_path):
    cfg = load_config("debug", TINY + ["llm.enabled=false"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        trainer.collect(1)  # 2 envs x 3 steps at replay_ratio 0.5: 3 updates owed
        real_step, done, calls = trainer.wm.train_step, [], []

        def flaky(batch):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed mid-stage")
            done.append(1)
            return real_step(batch)

        trainer.wm.train_step = flaky
        with pytest.raises(RuntimeError, match="mid-stage"):
            trainer.train_world_model(1)
        assert len(done) == 1
        retried = trainer.train_world_model(1)
        assert len(done) == 3 and retried.metrics["train/wm_updates"] == 3  # the stage's updates: both attempts'
        assert trainer.train_world_model(2).metrics["train/wm_updates"] == cfg.schedule.min_wm_updates  # nothing owed
    finally:
        trainer.close()


def test_closing_stops_a_stage_running_in_another_thread_before_it_shuts_its_envs_down(tmp_path):
    """Ctrl-C or SIGTERM unwinds the flow in the main thread while a stage runs in a Prefect task thread: closing
    the envs under that stage crashed the process (a segfault inside the interpreter's step)."""
    cfg = load_config("debug", TINY + ["llm.enabled=false", "collect.steps_per_iteration=400"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    env, real_collect, real_close = trainer.collect_pool.envs[0], trainer.collect, trainer.collect_pool.close
    real_step, stepping, returned = env.step, threading.Event(), threading.Event()
    closed_after_return, ended = [], []

    def slow_step(action):
        stepping.set()
        time.sleep(0.02)
        return real_step(action)

    def collect(iteration):
        try:
            return real_collect(iteration)
        finally:
            returned.set()

    def close():
        closed_after_return.append(returned.is_set())
        if returned.is_set():  # a close under the running stage is the crash this test is about
            real_close()

    def run():
        try:
            trainer.run_stage("collect", 1)
            ended.append("finished")
        except BaseException as err:
            ended.append(type(err).__name__)

    env.step, trainer.collect, trainer.collect_pool.close = slow_step, collect, close
    stage = threading.Thread(target=run)
    stage.start()
    assert stepping.wait(60)
    trainer.close()
    stage.join(60)
    assert closed_after_return == [True]
    assert ended == ["StageStopped"]  # at its next step, not after its 400
    with pytest.raises(StageStopped, match="closing"):
        trainer.run_stage("collect", 2)


def test_resume_restores_every_random_state_the_checkpoint_was_taken_with(tmp_path):
    """The replay's sampling RNG and Python's `random` continue where the checkpoint left them (re-seeding them
    from run.seed replayed the first iteration's world-model batches after every resume)."""
    import random

    cfg = load_config("debug", TINY + ["llm.enabled=false"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        trainer.collect(1)
        trainer.train_world_model(1)
        random.random()
        trainer.checkpoint(1)
        expected = (random.random(), trainer.replay.rng.random(), trainer.rng.random())
    finally:
        trainer.close()
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    try:
        assert (random.random(), resumed.replay.rng.random(), resumed.rng.random()) == expected
    finally:
        resumed.close()


def trained(run_dir):
    """What a run left: its last checkpoint's parts (sha256 each), its replay files, its metrics rows."""
    rows = [{k: v for k, v in row.items() if not wall_clock(k)} for row in read_metrics(run_dir)]
    replay = {p.name: p.read_bytes() for p in (run_dir / "replay").glob("iter-*.jsonl.gz")}
    return ckpt.latest_valid(run_dir / "checkpoints")[1]["files"], replay, rows


DETERMINISTIC = ["run.deterministic=true", "run.torch_threads=1"]  # see the one_thread fixture


def test_deterministic_runs_of_one_seed_write_identical_checkpoints_replay_files_and_metrics(tmp_path, one_thread):
    cfg = load_config("debug", TINY + ["llm.enabled=false", *DETERMINISTIC])
    for name in ("a", "b"):
        run_plain(cfg, tmp_path / name, iterations=2, progress=False)
    first, second = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert first[1] and len(first[2]) == 2
    assert first == second


def test_a_run_resumed_after_dying_mid_iteration_ends_as_the_uninterrupted_run(tmp_path, monkeypatch, one_thread):
    """A checkpoint every 2 iterations; iteration 4 dies in world-model training, after its collect wrote a replay
    file and moved the episodes on. The resume from checkpoint 2 sets the files and metrics rows of iterations 3
    and 4 aside, restores the episodes in progress and every RNG, and runs both again to the same checkpoint,
    replay and metrics as a run that never stopped."""
    cfg = load_config("debug", TINY + ["llm.enabled=false", "game.max_episode_steps=5", "run.checkpoint_freq=2",
                                       "schedule.iterations=4", "explore.random_steps=6", "explore.random_envs=2",
                                       *DETERMINISTIC])
    run_plain(cfg, tmp_path / "whole", progress=False)
    monkeypatch.setenv("PRIORZERO_FAULTS", "train_world_model-update@4")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_plain(cfg, tmp_path / "cut", progress=False)
    monkeypatch.delenv("PRIORZERO_FAULTS")
    assert [p.name[:11] for p in sorted((tmp_path / "cut" / "replay").iterdir())] == [
        "iter-000001", "iter-000002", "iter-000003", "iter-000004"]
    assert [int(r["iteration"]) for r in read_metrics(tmp_path / "cut")] == [1, 2, 3]

    run_plain(cfg, tmp_path / "cut", resume=True, progress=False)

    assert trained(tmp_path / "cut") == trained(tmp_path / "whole")
    assert len(list((tmp_path / "cut" / "replay").glob("iter-00000[34]-*.after-checkpoint-*"))) == 2
    assert list((tmp_path / "cut" / "logs").glob("metrics.jsonl.before-resume-*"))

"""One PriorZero run: every long-lived piece, and one method per pipeline stage.

An iteration is: evaluate (when due) → collect → train world model → train LLM → checkpoint.
`run_plain` drives it with a plain loop; the Prefect flow calls the same methods as tasks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import faults
from .agent import Agent, sequences_to_wm_batch
from .archive import Archive, Cell, demo_segment, demo_steps, robust_best, shorten
from .collector import Collector, SearchFreeExplorer
from .config import PriorZeroConfig, dump_config
from .errors import CheckpointError, ConfigError, StageStopped
from .evaluator import eval_modes, evaluate
from .games import EnvPool, game_spec
from .outcomes import CHECKPOINT_NAME as LOSSES, LossMemory
from .ppo.env_state import state_bytes, state_from_bytes
from .replay import ReplayBuffer, StepRecord

log = logging.getLogger("priorzero")

STAGES = ("evaluate", "collect", "train_world_model", "train_llm", "adapt", "ppo_train", "checkpoint")
WEIGHT_STAGES = ("train_world_model", "train_llm", "ppo_train")  # the stages that change the weights the agent acts with
DEMO_FILE = "demo.jsonl.gz"  # in a checkpoint's demo/: the trajectory the learners imitate, as they see it


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    skipped: Optional[str] = None  # why the stage had nothing to do (the flow shows it as a Skipped state)


def setup_run_logging(run_dir: Path) -> None:
    """Readable logs on the console and in run_dir/logs/train.log (added once per run dir)."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    target = str((logs / "train.log").resolve())
    root = logging.getLogger("priorzero")
    root.setLevel(logging.INFO)
    if not any(getattr(h, "baseFilename", None) == target for h in root.handlers):
        fh = logging.FileHandler(target)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for name in ("priorzero_core",):
        logging.getLogger(name).parent = root  # core modules log under the run's handler too


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    """Holds envs, models, replay and counters for one run directory."""

    def __init__(self, cfg: PriorZeroConfig, run_dir: Path | str, *, resume: bool = False, progress: bool = True,
                 readonly: bool = False):
        """`readonly` (a one-off evaluation, perhaps of a run still training): load the newest checkpoint and leave
        every file of the run dir as it is, its config.yaml, replay files and metrics rows included."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.readonly = readonly
        self._check_run_dir()
        setup_run_logging(self.run_dir)
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
            os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
            torch.use_deterministic_algorithms(True)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.rng = seed_everything(cfg.run.seed)
        self.device = pick_device(cfg.run.device)
        self.spec = game_spec(cfg.game)
        log.info("run %s: game %s (max score %s, %d actions kept, %d steps/episode), device %s",
                 self.run_dir, self.spec.name, self.spec.max_score, self.spec.action_space_size,
                 self.spec.max_episode_steps, self.device)
        self.iteration = 0
        # The committed checkpoint whose weights the agent acts with now: None once a stage has trained them
        # since (or before any checkpoint). An evaluation names it, so the agent logged for a good evaluation is
        # the one evaluated, not the weights one more iteration of training made.
        self.weights_checkpoint: Optional[Path] = None
        self.env_steps = 0
        self.random_steps = 0  # search-free exploration's env steps (explore.random_steps), not in the replay
        self._started = time.monotonic()  # for schedule.time_budget_s
        self._iteration_started = self._started  # moves on at each iteration, the first one included
        self._final: Optional[int] = None  # the iteration the time budget ends training at
        self._steps_since_wm = 0
        self._wm_updates_owed: Optional[int] = None  # world-model updates the current stage still owes
        self._wm_sums: dict[str, float] = {}  # the loss sums of the updates the stage did, and how many
        self._wm_done = 0
        self._collect_undo: Optional[dict] = None  # set while a collect stage runs; see collect()
        self._current: Optional[int] = None  # the iteration in progress
        self._metrics: dict[str, float] = {}  # its metrics so far
        self._failed: set[str] = set()  # its stages whose last attempt raised
        self._metrics_lock = threading.Lock()
        self._lock = threading.Lock()  # parallel mode: WM and LLM training share the replay buffer
        # Stages run in Prefect's task threads while Ctrl-C or SIGTERM unwinds the flow in the main thread:
        # close() sets `_closing` (the env pools raise StageStopped at their next step) and waits for the running
        # stages (thread id -> stage) to end before it shuts down the envs and workers they use.
        self._closing = threading.Event()
        self._running: dict[int, str] = {}
        self._running_changed = threading.Condition()

        from .text_encoder import TextEncoder
        from .world_model import WorldModelLearner

        self.encoder = TextEncoder.from_config(cfg.world_model, device=self.device)
        self.wm = WorldModelLearner(cfg.world_model, input_dim=self.encoder.dim, device=self.device)
        self.llm_prior, self.llm_trainer = self._build_llm()
        self.agent = Agent(cfg, self.spec, self.encoder, self.wm.model, self.llm_prior, self.rng, self.device)
        wmc = cfg.world_model
        self.replay = ReplayBuffer(cfg.replay.capacity_steps, wmc.discount, wmc.n_step, seed=cfg.run.seed,
                                   hazard_capacity=cfg.explore.hazard_capacity, absorbing=wmc.absorbing,
                                   td_lambda=wmc.td_lambda)
        sharded = cfg.collect.shards > 1 and not readonly  # collection runs on Ray actors (shards.py)
        # with shards, one env here: its valid-action workers serve the demonstration's recorder
        self.collect_pool = EnvPool(cfg.game, 1 if sharded else cfg.collect.num_envs, seed=cfg.run.seed,
                                    stop=self._closing)
        self.archive = Archive(cfg.explore, self.rng) if cfg.explore.enabled else None
        self.losses = LossMemory()  # which moves lost the game where (eval.avoid_known_losses)
        self._demo: Optional[tuple[str, int]] = None  # the archive cell (key, length) whose trajectory is imitated
        self._demo_value = 0.0  # its mean score over other game seeds (explore.demo_seeds)
        self._demo_passed: Optional[tuple[str, int]] = None  # the last best cell not imitated (demo_switch better)
        # (cell, trajectory length) -> what it holds there (archive.robust_best)
        self._seed_replays: dict[tuple[str, int], tuple[float, ...]] = {}
        self._replayer = None
        if self.archive is not None and cfg.explore.demo_seeds and self.spec.backend == "jericho":
            from .games.jericho_env import SeedReplayer

            # seeds apart from collection's (run.seed + env) and evaluation's (run.seed + 10_000 + episode)
            self._replayer = SeedReplayer(self.spec.path, [cfg.run.seed + 20_000 + k
                                                           for k in range(cfg.explore.demo_seeds)])
        self._recorder: Optional[EnvPool] = None  # plays a shortened demonstration once, to record its steps
        if sharded:  # search-free exploration runs in the shards too
            from .shards import ShardedCollector

            self.collector = ShardedCollector(cfg, self.archive, self.wm.model, self.llm_prior)
        else:
            self.collector = Collector(self.collect_pool, self.agent, cfg.collect.segment_length, cfg.collect.epsilon,
                                       self.rng, self.archive, cfg.explore, context=wmc.context_length - 1,
                                       loss_penalty=cfg.collect.loss_penalty)
        self.explorer: Optional[SearchFreeExplorer] = None
        if self.archive is not None and cfg.explore.random_steps and not sharded:
            # its own envs (game seeds apart from collection's, evaluation's and the replays'), the same
            # valid-action workers and cache
            pool = EnvPool(cfg.game, cfg.explore.random_envs, seed=cfg.run.seed + 30_000,
                           valid_actions=self.collect_pool.valid_actions, stop=self._closing)
            self.explorer = SearchFreeExplorer(pool, cfg, self.archive, self.rng, self.spec.action_space_size)
        self._eval_pool: Optional[EnvPool] = None
        self._ppo = None
        self._ppo_resume_dir: Optional[Path] = None
        self.collector.record_env_state = self.ppo_enabled  # PPO rewards replay actions from saved states
        if resume:
            self._resume()
        if not readonly:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))

    # ------------------------------------------------------------------ setup
    def _check_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"run directory {self.run_dir} is not writable ({err.strerror}); pick another run.run_dir") from None

    def _build_llm(self):
        if not self.cfg.llm.enabled:
            log.info("LLM prior disabled: search runs on the world model alone")
            return None, None
        from .llm_prior import make_llm_prior

        prior = make_llm_prior(self.cfg.llm, device=self.device)
        trainer = None
        if self.cfg.llm.train:
            from .llm_train import LLMTrainer

            trainer = LLMTrainer(prior, self.cfg.llm, seed=self.cfg.run.seed)
        return prior, trainer

    @property
    def eval_pool(self) -> EnvPool:
        if self._eval_pool is None:  # an env (and its own game seed) per episode, up to 16 played at once
            n = min(self.cfg.eval.num_episodes, 16)
            self._eval_pool = EnvPool(self.cfg.game, n, seed=self.cfg.run.seed + 10_000, stop=self._closing)
        return self._eval_pool

    @property
    def ppo_enabled(self) -> bool:
        """ORZ PPO trains the LLM (instead of the built-in SFT/RFT) when `ppo.use_orz_trainer` says so or Ray is there."""
        from .ppo.trainer import orz_enabled

        return self.llm_trainer is not None and orz_enabled(self.cfg)

    @property
    def ppo(self):
        """The PPO trainer (Ray actors), started on first use and kept for the whole run."""
        if self._ppo is None:
            from .ppo.trainer import PPOTrainer

            self._ppo = PPOTrainer(self.cfg, self.run_dir, policy_model=self.llm_prior.trainable_model())
            if self._ppo_resume_dir is not None:
                self._ppo.load(self._ppo_resume_dir)
        return self._ppo

    # ------------------------------------------------------------------ schedule
    @property
    def overlap_world_model(self) -> bool:
        """Parallel mode trains the world model beside the LLM stages (not in a deterministic run: the two
        would draw from torch's one global RNG in whatever order the threads run)."""
        return self.cfg.schedule.mode == "parallel" and not self.cfg.run.deterministic

    def due(self, stage: str, iteration: int) -> bool:
        """Whether `stage` runs in `iteration` (1-based), from the schedule in the config."""
        sch, last = self.cfg.schedule, self.stop_after(iteration)
        llm_turn = self.llm_trainer is not None and iteration % sch.llm_train_freq == 0
        if stage == "evaluate":
            return (iteration - 1) % self.cfg.eval.eval_freq == 0 or last
        if stage == "collect":
            return True
        if stage == "train_world_model":
            if sch.mode == "alternating" and llm_turn:
                return False
            return iteration % sch.wm_train_freq == 0
        if stage == "train_llm":
            return llm_turn and not self.ppo_enabled
        if stage in ("adapt", "ppo_train"):
            return llm_turn and self.ppo_enabled
        if stage == "checkpoint":
            return iteration % self.cfg.run.checkpoint_freq == 0 or last
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")

    # ------------------------------------------------------------------ stages
    def evaluate(self, iteration: int) -> StageResult:
        modes = eval_modes(self.cfg, self.llm_prior is not None)
        max_steps = self.cfg.eval.max_episode_steps or self.spec.max_episode_steps
        with torch.inference_mode():
            result = evaluate(self.eval_pool, self.agent, modes, self.cfg.eval, max_steps, progress=self.progress,
                              losses=self.losses)
        path = self.run_dir / "transcripts" / f"eval-{iteration:06d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a re-run iteration or `priorzero eval` keeps the earlier transcript
            path = path.with_name(f"eval-{iteration:06d}-{int(time.time())}.txt")
        path.write_text(result.transcript)
        artifacts = {"transcript": path}
        if self.weights_checkpoint is not None:  # the checkpoint holding the weights played (the first: none)
            artifacts["evaluated_checkpoint"] = self.weights_checkpoint
            result.metrics["evals/weights_iteration"] = float(ckpt.checkpoint_iteration(self.weights_checkpoint))
        log.info("iteration %d eval: reward_mean %.2f (%s)", iteration, result.metrics["evals/reward_mean"],
                 ", ".join(f"{m} {result.metrics[f'evals/{m}/reward_mean']:.1f}" for m in modes))
        return StageResult(metrics=result.metrics, artifacts=artifacts)

    def collect(self, iteration: int) -> StageResult:
        if self._collect_undo is not None:  # an earlier attempt failed part-way: start over from where it started
            self._restore_collect(self._collect_undo)
        self._collect_undo = self._snapshot_collect()
        if self.llm_prior is not None:
            self.llm_prior.cache_stats()  # count this stage's lookups only (evaluation scores too)
        valid_actions = self.collect_pool.valid_actions
        if valid_actions is not None:
            valid_actions.stats()
        with torch.inference_mode():
            segments, stats = self.collector.collect(self.cfg.collect.steps_per_iteration, iteration, progress=self.progress)
        explored, hazards = None, []
        if self.explorer is not None:
            explored, hazards = self.explorer.explore(iteration)
        elif not isinstance(self.collector, Collector):  # the shards explored after collecting
            explored, hazards = self.collector.explored, self.collector.hazards
        if explored is not None:
            self.random_steps += explored.env_steps
        segments += hazards
        path = ReplayBuffer.segment_file(self.run_dir / "replay", iteration, ReplayBuffer.content_tag(segments))
        ReplayBuffer.write_segments(path, segments)
        with self._lock:
            self.replay.add(segments)
            self._refresh_demo()
            self.losses.add(stats.outcomes)  # after whatever may fail: a retried stage counts its steps once
            if explored is not None:
                self.losses.add(explored.outcomes)
        self.env_steps += stats.env_steps
        self._steps_since_wm += stats.env_steps
        self._collect_undo = None  # what this stage did is in the replay now
        metrics = stats.metrics()
        if self.archive is not None:
            metrics.update(self.archive.metrics())
            metrics["explore/demo_seed_score"] = self._demo_value
        if explored is not None:
            metrics["explore/random_steps"] = float(explored.env_steps)
            metrics["explore/random_steps_per_s"] = explored.env_steps / max(explored.seconds, 1e-9)
            metrics["explore/total_random_steps"] = float(self.random_steps)
            if self.cfg.explore.hazard_fraction:
                metrics["explore/hazards"] = float(len(hazards))
        if self.llm_prior is not None:
            hits, misses = self.llm_prior.cache_stats()
            if hits + misses:
                metrics["collect/llm_prior_cache_hit_rate"] = hits / (hits + misses)
        if valid_actions is not None:  # Jericho games: how much of the step's main cost the cache saved
            hits, misses, seconds = valid_actions.stats()
            if hits + misses:
                metrics["collect/valid_actions_cache_hit_rate"] = hits / (hits + misses)
                metrics["collect/valid_actions_s"] = seconds
        metrics["collect/total_env_steps"] = float(self.env_steps)
        metrics["collect/known_losing_moves"] = float(self.losses.losing_moves())
        metrics["replay/steps"] = float(len(self.replay))
        log.info("iteration %d collect: %d steps (%.1f/s), %d episodes ended", iteration, stats.env_steps,
                 metrics["collect/steps_per_s"], stats.episodes)
        return StageResult(metrics=metrics, artifacts={"replay": path})

    def _snapshot_collect(self) -> dict:
        """What a collect changes besides the replay: the envs and their episodes, the run's RNG, the archive."""
        return {"collector": self.collector.snapshot(), "rng": self.rng.bit_generator.state,
                "archive": self.archive.snapshot() if self.archive is not None else None}

    def _restore_collect(self, snap: dict) -> None:
        self.collector.restore(snap["collector"])
        self.rng.bit_generator.state = snap["rng"]
        if self.archive is not None:
            self.archive.restore(snap["archive"])

    def _demo_cell(self) -> Optional[tuple[Cell, float]]:
        """The archive cell whose trajectory the learners imitate and what it scores: the best score, shortest
        first; with a seed replayer, the best mean over other game seeds (`explore.demo_seeds`) of what it holds
        one move past its end (`explore.demo_end_check`), then the safest end. None while the archive is empty."""
        if self.archive is None or not self.archive.cells:
            return None
        if self._replayer is None:
            best = self.archive.best()
            return best, float(best.score)

        def held(cell) -> tuple[float, float]:  # the moves the learners would imitate (loops cut, if they are)
            steps = demo_steps(cell, self.cfg.explore.demo_cut_loops)
            outcomes = self._replayer.outcomes([s.action for s in steps], self._end_probes(cell))
            return float(np.mean([h for h, _ in outcomes])), float(np.mean([safe for _, safe in outcomes]))

        chosen = robust_best(self.archive.candidates(self.cfg.explore.demo_candidates), held, self._seed_replays)
        return (chosen[0], chosen[1][0]) if chosen is not None else None

    def _end_probes(self, cell: Cell) -> tuple[str, ...]:
        """The commands tried one move past the end of the trajectory to `cell` (`explore.demo_end_check`): the
        valid actions of the cell's own state."""
        last = getattr(cell.state, "last", None)  # a JerichoState's last TimeStep
        return tuple(last.valid_actions) if self.cfg.explore.demo_end_check and last is not None else ()

    def _refresh_demo(self) -> None:
        """Imitate the archive's best trajectory once it scores (self-imitation); rebuilt when a better one is found."""
        chosen = self._demo_cell()
        if chosen is None or chosen[0].score <= 0 or chosen[1] <= 0:
            return
        best, value = chosen
        if (best.key, best.length) in (self._demo, self._demo_passed):
            return
        steps = demo_steps(best, self.cfg.explore.demo_cut_loops)
        if self._replayer is not None and self.cfg.explore.demo_shorten:
            probes = self._end_probes(best)

            def holds(actions: list[str]) -> list[float]:  # a move goes where neither figure drops on any seed
                outcomes = self._replayer.outcomes(actions, probes)
                return [h for h, _ in outcomes] + [safe for _, safe in outcomes]

            moves = [s.action for s in steps]
            kept, _ = shorten(list(range(len(moves))), lambda ks: holds([moves[k] for k in ks]),
                              span=self.cfg.explore.demo_shorten_span)
            recorded = self._record_shortened(moves, kept) if len(kept) < len(moves) else None
            if recorded is not None:
                held = holds([s.action for s in recorded])
                recorded_value = float(np.mean(held[:len(held) // 2]))
                if recorded_value >= value:  # moves put back while recording may hold less
                    steps, value = recorded, recorded_value
        if self.cfg.explore.demo_switch == "better" and self.replay.demos:
            imitated = len(self.replay.demos[0].steps)
            if (value, -len(steps)) <= (self._demo_value, -imitated):
                self._demo_passed = (best.key, best.length)
                log.info("kept imitating the trajectory of %d moves (%.1f on other game seeds): the best found now, "
                         "score %d in %d steps (%d imitated, %.1f), is not better", imitated, self._demo_value,
                         best.score, best.length, len(steps), value)
                return
        demo = demo_segment(best, self.cfg.world_model.discount, steps=steps,
                            smoothing=self.cfg.explore.demo_smoothing)
        self._demo_value = value
        if self.llm_prior is not None:  # the LLM learns from the prompts it would see on that trajectory
            history = []
            for step in demo.steps:
                step.prompt = self.llm_prior.build_prompt(history, step.observation, step.valid_actions)
                history.append((step.observation, step.action, step.reward))
        self.replay.set_demos([demo])
        self._demo = (best.key, best.length)
        log.info("imitating the best trajectory found: score %d in %d steps (%d imitated), %.1f on other game "
                 "seeds", best.score, best.length, len(demo.steps), self._demo_value)

    def _record_shortened(self, moves: list[str], kept: list[int]) -> Optional[list[StepRecord]]:
        """The shortened trajectory (`moves` at the indices `kept`) recorded as the learners see it (`_record`).
        Where a kept move is not a valid action in the state the moves before it reach (leaving moves out changed
        what the game's valid-action detection finds there), the latest move left out before it is put back and
        the recording starts again, until one succeeds or every move before it is back (None)."""
        kept = sorted(kept)
        while True:
            recorded = self._record([moves[k] for k in kept])
            if not isinstance(recorded, int):
                return recorded
            if recorded == len(kept):
                log.info("the shortened trajectory ends the game before its last move: imitating it whole")
                return None
            left_out = set(range(kept[recorded])) - set(kept)
            if not left_out:
                log.info("the shortened trajectory's move %d (%s) is not a valid action there: imitating it whole",
                         recorded, moves[kept[recorded]])
                return None
            log.info("the shortened trajectory's move %d (%s) is not a valid action there: move %d (%s) put back",
                     recorded, moves[kept[recorded]], max(left_out), moves[max(left_out)])
            kept = sorted([*kept, max(left_out)])

    def _record(self, actions: list[str]) -> list[StepRecord] | int:
        """`actions` played from the game's start under the first of the replays' game seeds, as the steps the
        learners see there; else the index of the first that is not among its state's valid actions (no agent
        could choose it), or len(actions) where the game ends before the last."""
        if self._recorder is None:
            self._recorder = EnvPool(self.cfg.game, 1, seed=self.cfg.run.seed + 20_000,
                                     valid_actions=self.collect_pool.valid_actions, stop=self._closing)
        (ts,) = self._recorder.reset([0])
        steps = []
        for k, action in enumerate(actions):
            if ts.done:
                return len(actions)
            if action not in ts.valid_actions:
                return k
            (after,) = self._recorder.step([action], [0])
            steps.append(StepRecord(observation=ts.observation, valid_actions=list(ts.valid_actions),
                                    action_index=ts.valid_actions.index(action), action=action,
                                    reward=float(after.reward), score=int(after.score), visit_dist=[],
                                    root_value=0.0, state_hash=ts.state_hash))
            ts = after
        return steps

    def wm_batch(self):
        """A world-model batch: sequences of unroll_steps + 1 steps, each with the history a search root has."""
        wmc = self.cfg.world_model
        with self._lock:  # the encoder's cache and the replay are shared with LLM training
            seqs = self.replay.sample(wmc.batch_size, wmc.unroll_steps + 1, wmc.context_length - 1,
                                      self.cfg.explore.demo_fraction, self.cfg.explore.hazard_fraction, wmc.reanalyse)
            return sequences_to_wm_batch(seqs, self.encoder, self.spec.action_space_size, self.device,
                                         history=wmc.context_length - 1)

    def train_world_model(self, iteration: int) -> StageResult:
        sch = self.cfg.schedule
        if len(self.replay) == 0 or self.env_steps < sch.warmup_steps:
            return StageResult(skipped=f"{self.env_steps} env steps collected, training starts after "
                                       f"{max(1, sch.warmup_steps)}")
        # The updates owed are fixed on the stage's first attempt; a retry after a failure part-way does the rest
        # and reports the losses of all of them.
        if self._wm_updates_owed is None:
            self._wm_updates_owed = max(sch.min_wm_updates, round(sch.replay_ratio * self._steps_since_wm))
            self._steps_since_wm = 0
            self._wm_sums, self._wm_done = {}, 0
        sums = self._wm_sums
        for _ in tqdm(range(self._wm_updates_owed), desc=f"world model {iteration}", disable=not self.progress, leave=False):
            if self._closing.is_set():
                raise StageStopped(f"train_world_model-{iteration}: the trainer is closing")
            for k, v in self.wm.train_step(self.wm_batch()).items():
                sums[k] = sums.get(k, 0.0) + v
            self._wm_done += 1
            self._wm_updates_owed -= 1
            faults.inject("train_world_model-update", iteration)  # test hook: fail mid-stage
        self._wm_updates_owed = None
        updates = self._wm_done
        if not updates:
            return StageResult(skipped="no world-model updates owed (min_wm_updates 0)")
        metrics = {k: v / updates for k, v in sums.items()}
        metrics["train/wm_updates"] = float(updates)
        log.info("iteration %d world model: %d updates, loss %.4f", iteration, updates, metrics["train/wm_total_loss"])
        return StageResult(metrics=metrics)

    def train_llm(self, iteration: int) -> StageResult:
        if self.llm_trainer is None:
            return StageResult(skipped="no LLM to train (llm.enabled is false)")
        n = self.cfg.llm.batch_size * self.cfg.llm.updates_per_train
        with self._lock:
            recent = [(seg, t) for seg, t in self.replay.recent(4 * n) if seg.steps[t].prompt is not None]
            demos = self.replay.demo_steps()
            n_demo = min(len(demos), round(n * self.cfg.explore.demo_fraction))
            picks = [recent[i] for i in self.rng.permutation(len(recent))[:n - n_demo]] if recent else []
            picks += [demos[i] for i in self.rng.permutation(len(demos))[:n_demo]]
            targets = [self.replay.value_target(seg, t) for seg, t in picks]
            contexts = [self.replay.sequence(seg, t, 1, self.cfg.world_model.context_length - 1) for seg, t in picks]
            samples = self.agent.llm_samples(picks, targets, contexts) if picks else []
        if not samples:
            return StageResult(skipped="no collected step has an LLM prompt to train on")
        metrics = self.llm_trainer.train(samples)
        log.info("iteration %d LLM: sft %.4f rft %.4f on %d samples", iteration, metrics.get("train/llm_sft_loss", 0.0),
                 metrics.get("train/llm_rft_loss", 0.0), len(samples))
        return StageResult(metrics=metrics)

    def adapt(self, iteration: int) -> StageResult:
        """Segments of the last `llm_train_freq` iterations → a PPO prompts file."""
        since = iteration - self.cfg.schedule.llm_train_freq
        with self._lock:
            segments = [seg for seg in self.replay.segments if seg.iteration > since and any(s.env_state for s in seg.steps)]
        if not segments:
            return StageResult(skipped=f"no states collected since iteration {since} to make PPO prompts of")
        with self._restart_ppo_on_failure():
            path = self.ppo.adapt(segments, iteration)
        return StageResult(metrics={"ppo/prompt_segments": float(len(segments))}, artifacts={"prompts": path})

    def ppo_train(self, iteration: int, prompts: Path) -> StageResult:
        with self._restart_ppo_on_failure():
            metrics = self.ppo.train(prompts)
        model = self.llm_prior.trainable_model()
        with self._lock:  # MCTS scores with the PPO-updated policy from the next collect on
            self.ppo.sync_to(model)
            self.llm_prior.sync_weights(model)
        log.info("iteration %d PPO: reward %.3f, kl %.4f", iteration, metrics.get("train/ppo_reward_mean", 0.0),
                 metrics.get("train/ppo_kl", 0.0))
        return StageResult(metrics=metrics)

    @contextlib.contextmanager
    def _restart_ppo_on_failure(self) -> Iterator[None]:
        """A PPO stage that fails (a dead Ray actor or node, an OOM-killed worker) takes its actors down with it:
        the stage's retry, or the next PPO iteration, starts fresh ones instead of calling dead actors forever.
        They go on from the failed actors' own state where those still answer (`PPOTrainer.rescue`, kept in
        run_dir/ppo-rescue), else from the newest checkpoint's PPO state, else from the policy the MCTS prior has
        and a new critic."""
        try:
            yield
        except Exception:
            ppo, self._ppo = self._ppo, None
            rescue = self.run_dir / "ppo-rescue"
            shutil.rmtree(rescue, ignore_errors=True)
            rescued = ppo is not None and ppo.rescue(rescue)
            if ppo is not None:
                try:
                    ppo.close()
                except Exception as err:  # noqa: BLE001 - the stage's own error is the one to report
                    log.warning("closing the failed PPO actors: %s", err)
            if rescued:
                self._ppo_resume_dir = rescue
            else:
                found = ckpt.latest_valid(self.run_dir / "checkpoints")
                ppo_dir = found[0] / "ppo" if found is not None else None
                self._ppo_resume_dir = ppo_dir if ppo_dir is not None and ppo_dir.is_dir() else None
            log.warning("PPO stage failed: its actors are stopped; the next PPO stage starts new ones from %s",
                        self._ppo_resume_dir or "the prior's policy and a new critic")
            raise

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, iteration: int) -> StageResult:
        writer = ckpt.CheckpointWriter(self.run_dir / "checkpoints", iteration)
        try:
            wm_state = self.wm.state_dict()
            writer.tensors("world_model", wm_state["model"])
            writer.tensors("world_model_target", wm_state["target"])
            writer.torch_state("world_model_optim", {"optimizer": wm_state["optimizer"], "steps": wm_state["steps"]})
            if self.llm_trainer is not None:
                writer.directory("llm", self.llm_trainer.save_state)
            if self._ppo is not None:
                writer.directory("ppo", self._ppo.save)
            elif self._ppo_resume_dir is not None and self._ppo_resume_dir.is_dir():
                # the actors are down after a failed stage and start again from this state: it stays checkpointed
                # (an older checkpoint holding it may be pruned before the next PPO stage)
                resume_from = self._ppo_resume_dir
                writer.directory("ppo", lambda d: shutil.copytree(resume_from, d, copy_function=_link_or_copy,
                                                                  dirs_exist_ok=True))
            if self.archive is not None:
                writer.directory("archive", lambda d: self.archive.save(d, state_bytes))
            if self.replay.demos:  # what is imitated: the archive's best cell need not be it (explore.demo_switch)
                demos = list(self.replay.demos)
                writer.directory("demo", lambda d: ReplayBuffer.write_segments(d / DEMO_FILE, demos))
            writer.json("collector", self.collector.state())
            writer.json(LOSSES, self.losses.to_json())
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            if self.llm_trainer is not None:
                rng["llm"] = self.llm_trainer.generator.get_state()
            writer.torch_state("rng", rng)
            version, internal, gauss = random.getstate()
            meta = {
                "iteration": iteration,
                "env_steps": self.env_steps,
                "random_steps": self.random_steps,
                "config_hash": self.cfg.config_hash(),
                "numpy_rng": self.rng.bit_generator.state,
                "replay_rng": self.replay.rng.bit_generator.state,
                "python_rng": [version, list(internal), gauss],
                "replay_steps": len(self.replay),
                "steps_since_wm": self._steps_since_wm,
                "demo": list(self._demo) if self._demo is not None else None,
                "demo_value": self._demo_value,
                # This iteration's metrics row as far as it goes (all but the checkpoint's own time): a resume
                # restores it when the process died before the row was written.
                "metrics": {**self._metrics, "iteration/failed": float(bool(self._failed)),
                            "timing/iteration_s": time.monotonic() - self._iteration_started},
            }
            path = writer.commit(meta)
        except BaseException:
            writer.abort()
            raise
        if self._ppo is None and (path / "ppo").is_dir():
            self._ppo_resume_dir = path / "ppo"
        self.weights_checkpoint = path
        ckpt.prune(self.run_dir / "checkpoints", self.cfg.run.keep_checkpoints)
        faults.inject("checkpoint-done", iteration)  # test hook: committed, the iteration's metrics not yet logged
        self.iteration = iteration
        log.info("iteration %d checkpoint: %s", iteration, path)
        return StageResult(metrics={}, artifacts={"checkpoint": path})

    def run_stage(self, stage: str, iteration: int, *args: object) -> StageResult:
        """Run one stage of the iteration in progress (the fault hook first, see faults.py); its metrics, with
        its time, go into the iteration's metrics row. A stage that raises records nothing, and the iteration
        counts as failed unless a retry of that stage succeeds."""
        with self._running_changed:
            if self._closing.is_set():
                raise StageStopped(f"{stage}-{iteration} not started: the trainer is closing")
            self._running[threading.get_ident()] = stage
        if stage in WEIGHT_STAGES:
            self.weights_checkpoint = None
        try:
            faults.inject(stage, iteration)
            start = time.perf_counter()
            result: StageResult = getattr(self, stage)(iteration, *args)
        except BaseException:
            self._failed.add(stage)
            raise
        finally:
            with self._running_changed:
                del self._running[threading.get_ident()]
                self._running_changed.notify_all()
        self._failed.discard(stage)
        result.metrics[f"timing/{stage}_s"] = time.perf_counter() - start
        with self._metrics_lock:  # parallel mode: the world-model stage finishes beside the LLM's
            self._metrics.update(result.metrics)
        return result

    def begin_iteration(self, iteration: int) -> None:
        """Call before each iteration: with a time budget, the iteration that will end past it is the last
        (judged by the previous iteration's length), so it evaluates and checkpoints as a schedule's last does."""
        now, budget = time.monotonic(), self.cfg.schedule.time_budget_s
        if budget is not None and self._final is None and self._iteration_started > self._started:
            if now - self._started + (now - self._iteration_started) >= budget:
                self._final = iteration
                log.info("iteration %d is the last: the time budget of %.0f s ends with it", iteration, budget)
        self._iteration_started = now
        self._current = iteration
        self._metrics = {}
        self._failed = set()

    def finish_iteration(self, iteration: int, failed: bool = False) -> dict[str, float]:
        """Call after each iteration, whatever its stages did: appends its metrics row (what its completed
        stages measured, `iteration/failed` 0 or 1: whether a stage failed after its retries, and
        `timing/iteration_s`) to logs/metrics.jsonl and returns it."""
        row = {**self._metrics, "iteration/failed": float(failed or bool(self._failed)),
               "timing/iteration_s": time.monotonic() - self._iteration_started}
        append_metrics(self.run_dir, iteration, row)
        self.iteration = max(self.iteration, iteration)
        self._current = None
        return row

    @property
    def in_iteration(self) -> bool:
        """Between begin_iteration and finish_iteration: the models may hold part of an iteration's work."""
        return self._current is not None

    def stop_after(self, iteration: int) -> bool:
        """Whether training ends with `iteration` (the schedule's last, or the time budget's)."""
        return iteration in (self.cfg.schedule.iterations, self._final)

    def _resume(self) -> None:
        root = self.run_dir / "checkpoints"
        found = ckpt.latest_valid(root)
        if found is None:
            if ckpt.list_checkpoints(root):
                raise CheckpointError(f"no checkpoint in {root} verifies (all are incomplete or corrupt); start a new run dir")
            log.info("resume: no checkpoint in %s yet, starting fresh", root)
            if not self.readonly:
                self._set_aside_replay(0)
                restore_metrics(self.run_dir, 0, None)
            return
        path, manifest = found
        meta = manifest["meta"]
        if meta.get("config_hash") != self.cfg.config_hash():
            raise CheckpointError(
                f"checkpoint {path} was made with another config (hash {meta.get('config_hash')} ≠ {self.cfg.config_hash()}: "
                "game, LLM or world-model shape changed); resume with the run's own config.yaml or use a new run dir"
            )
        ckpt.set_aside_newer(root, meta["iteration"])
        optim = ckpt.load_torch_state(path, "world_model_optim")
        self.wm.load_state_dict({"model": ckpt.load_tensors(path, "world_model"),
                                 "target": ckpt.load_tensors(path, "world_model_target"),
                                 "optimizer": optim["optimizer"], "steps": optim["steps"]})
        if self.llm_trainer is not None and (path / "llm").is_dir():
            self.llm_trainer.load_state(path / "llm")
        if (path / "ppo").is_dir():
            self._ppo_resume_dir = path / "ppo"  # loaded when the PPO actors start
        if self.archive is not None and (path / "archive").is_dir():
            self.archive.load(path / "archive", state_from_bytes)
        if (path / "demo" / DEMO_FILE).is_file() and meta.get("demo"):
            self.replay.set_demos(ReplayBuffer.read_segments(path / "demo" / DEMO_FILE))
            self._demo, self._demo_value = (str(meta["demo"][0]), int(meta["demo"][1])), float(meta["demo_value"])
        if ckpt.json_path(path, LOSSES).is_file():
            self.losses = LossMemory.from_json(ckpt.load_json(path, LOSSES))
        if ckpt.json_path(path, "collector").is_file() and not self.readonly:  # the episodes in progress go on
            self.collector.load_state(ckpt.load_json(path, "collector"))
        rng = ckpt.load_torch_state(path, "rng")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.llm_trainer is not None and "llm" in rng:
            self.llm_trainer.generator.set_state(rng["llm"])
        self.rng.bit_generator.state = meta["numpy_rng"]
        if "replay_rng" in meta:
            self.replay.rng.bit_generator.state = meta["replay_rng"]
        if isinstance(meta.get("python_rng"), list):
            version, internal, gauss = meta["python_rng"]
            random.setstate((version, tuple(internal), gauss))
        self.iteration = int(meta["iteration"])
        self.weights_checkpoint = path
        self.env_steps = int(meta["env_steps"])
        self.random_steps = int(meta.get("random_steps", 0))
        self._steps_since_wm = int(meta.get("steps_since_wm", 0))
        if not self.readonly:
            self._set_aside_replay(self.iteration)
            restore_metrics(self.run_dir, self.iteration, meta.get("metrics"))
        self.replay.load_dir(self.run_dir / "replay", up_to=self.iteration)
        if len(self.replay) != meta.get("replay_steps", len(self.replay)):
            log.warning("resume: the replay files hold %d steps where checkpoint %s counted %d (files were moved or "
                        "removed); training goes on, but not as the interrupted run would have",
                        len(self.replay), path.name, meta["replay_steps"])
        self._refresh_demo()
        log.info("resumed from %s: iteration %d, %d env steps, %d replay steps", path.name, self.iteration,
                 self.env_steps, len(self.replay))

    def _set_aside_replay(self, iteration: int) -> None:
        """The iterations after the checkpoint run again and collect again: their earlier files are renamed
        aside (kept, not loaded), so no step counts twice."""
        moved = ReplayBuffer.set_aside_after(self.run_dir / "replay", iteration)
        if moved:
            log.info("resume: %d replay files of iterations after %d renamed aside (*.after-checkpoint-*)",
                     len(moved), iteration)

    # ------------------------------------------------------------------ teardown
    def close(self, stage_wait_s: float = 600.0) -> None:
        """Shut envs and workers down; each part independently. The Ray actors (PPO, collection shards) go first: a
        stage waiting on them gets their error at once. Stages still running in other threads are then asked to stop
        (their env pools raise StageStopped at the next step, the world-model stage at its next update) and waited
        for: shutting down an env that a stage is stepping crashes the process. Where one is still running after
        `stage_wait_s`, the in-process envs and workers are left to the process's exit."""
        self._closing.set()
        errors: list[Exception] = []

        def shut(*parts: object) -> None:
            for part in parts:
                if part is None:
                    continue
                try:
                    part.close()  # type: ignore[attr-defined]
                except Exception as err:  # keep closing the rest
                    errors.append(err)

        shut(self._ppo, None if isinstance(self.collector, Collector) else self.collector)
        with self._running_changed:
            others = lambda: {t: s for t, s in self._running.items() if t != threading.get_ident()}  # noqa: E731
            if others():
                log.info("closing: waiting for the running stage(s) to stop: %s", ", ".join(others().values()))
            stopped = self._running_changed.wait_for(lambda: not others(), timeout=stage_wait_s)
            if not stopped:
                log.warning("closing: %s still running after %.0f s; envs and workers are left to the process's exit",
                            ", ".join(others().values()), stage_wait_s)
        if stopped:
            shut(self._recorder, self.explorer, self.collect_pool, self._eval_pool, self._replayer)
        for err in errors:
            log.warning("while closing: %s", err)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows one (checkpoint files are never written in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / "metrics.jsonl"


def append_metrics(run_dir: Path, iteration: int, row: dict[str, float]) -> None:
    with open(metrics_path(run_dir), "a") as fh:
        fh.write(json.dumps({"iteration": iteration, **row}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """logs/metrics.jsonl's rows (a line cut short by a crash is skipped)."""
    path = metrics_path(run_dir)
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def restore_metrics(run_dir: Path, iteration: int, checkpointed: Optional[dict[str, float]]) -> None:
    """Make logs/metrics.jsonl hold one row per iteration up to `iteration`, the resume's checkpoint, and none
    after it (those iterations run again): the checkpoint's own row comes from its metadata when the process
    died before writing it. A file that changes is kept beside as metrics.jsonl.before-resume-<ns>."""
    rows = read_metrics(run_dir)
    kept = {int(r["iteration"]): r for r in rows if int(r["iteration"]) <= iteration}
    if checkpointed is not None and iteration not in kept:
        kept[iteration] = {"iteration": iteration, **checkpointed}
    new = [kept[k] for k in sorted(kept)]
    if new == rows:
        return
    path = metrics_path(run_dir)
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.before-resume-{time.time_ns()}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in new))
    os.replace(tmp, path)


def run_plain(cfg: PriorZeroConfig, run_dir: Path | str, iterations: Optional[int] = None, resume: bool = False,
              progress: bool = True) -> list[dict[str, float]]:
    """The training loop without orchestration: used by tests, benchmarks and as the reference behaviour."""
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    history: list[dict[str, float]] = []
    try:
        last = iterations or cfg.schedule.iterations
        for it in range(trainer.iteration + 1, last + 1):
            trainer.begin_iteration(it)
            prompts: Optional[Path] = None
            for stage in STAGES:
                if trainer.due(stage, it):
                    if stage == "ppo_train":
                        if prompts is None:  # adapt skipped itself: nothing collected to make prompts of
                            continue
                        result = trainer.run_stage(stage, it, prompts)
                    else:
                        result = trainer.run_stage(stage, it)
                    prompts = result.artifacts.get("prompts", prompts)
            history.append({"iteration": float(it), **trainer.finish_iteration(it)})
            if trainer.stop_after(it):
                break
    finally:
        trainer.close()
    return history

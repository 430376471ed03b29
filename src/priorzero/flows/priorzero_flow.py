"""The `priorzero` flow: every training iteration is a small DAG of retried stage tasks.

evaluate (when due) → collect → train_world_model (when due) → LLM (adapt + ppo_train with PPO on,
else train_llm; when due) → checkpoint (when due). A stage that still fails after its retries marks the
stages that need it as Skipped for that iteration and training goes on; only a run of
`run.max_consecutive_failed_iterations` failed iterations fails the flow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional
from uuid import UUID

import psutil
from prefect import Task, flow, get_client, get_run_logger
from prefect.exceptions import ObjectNotFound, TerminationSignal
from prefect.futures import PrefectFuture
from prefect.logging.formatters import PrefectFormatter
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.states import Crashed, State
from prefect.task_runners import ThreadPoolTaskRunner

from priorzero.flows.artifacts import CLOSE_TIMEOUT_S, KILLED_CLOSE_TIMEOUT_S, RunArtifacts
from priorzero.tasks import Tracker, close_trainer, configured_stages, open_trainer, skipped, trainer_for
from priorzero_core.config import PriorZeroConfig, is_plain_name, load_config, resolve_config_path
from priorzero_core.errors import ConfigError
from priorzero_core.preflight import check_inputs
from priorzero_core.trainer import Trainer, read_metrics

# A stage runs only if each stage it needs, when that one ran this iteration, completed.
NEEDS: dict[str, tuple[str, ...]] = {
    "train_world_model": ("collect",),
    "train_llm": ("collect",),
    "adapt": ("collect",),
    "ppo_train": ("adapt",),
    "checkpoint": ("collect", "train_world_model", "train_llm", "adapt", "ppo_train"),
}
LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "priorzero")
FLOW_RUNS_FILE = "prefect_flow_runs.json"  # in the run dir: the flow runs that trained it, oldest first
TRAINING_PID_FILE = "training.pid"  # in the run dir: the process training it (left behind by a crash)


class TrainingFailed(RuntimeError):
    """Too many iterations in a row had a stage that failed after its retries."""


@dataclass
class Iteration:
    """One iteration's stage states, the reasons of the stages skipped because one they need failed, and the
    artifacts of the stages that completed (their metrics the trainer keeps: `Trainer.finish_iteration`)."""

    number: int
    states: dict[str, State] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)

    def record(self, stage: str, state: State) -> None:
        self.states[stage] = state
        if state.is_completed() and stage not in self.blocked:
            self.artifacts.update(state.result().artifacts)

    def skip_reason(self, stage: str) -> Optional[str]:
        for need in NEEDS.get(stage, ()):
            if need in self.blocked:
                return self.blocked[need]
            state = self.states.get(need)
            if state is not None and not state.is_completed():
                return f"{need}-{self.number} failed"
        if stage == "ppo_train" and "adapt" in self.states and "prompts" not in self.artifacts:
            return self.states["adapt"].message or f"adapt-{self.number} made no prompts"  # it skipped itself
        return None

    def failure(self) -> Optional[str]:
        """'stage-N: error' for the first stage that failed, else None."""
        for stage, state in self.states.items():
            if state.is_failed() or state.is_crashed():
                err = state.result(raise_on_failure=False)
                return f"{stage}-{self.number}: {type(err).__name__}: {err}"
        return None

    def failure_row(self, failure: Optional[str]) -> Optional[dict[str, Any]]:
        """The row of the run's failures table for an iteration that failed with `failure` (see `failure`):
        the iteration, the stage that failed and why, and the stages skipped because of it."""
        if failure is None:
            return None
        return {"iteration": self.number, "failure": failure,
                "skipped": ", ".join(f"{stage}-{self.number}" for stage in self.blocked)}


def run_iteration(stages: dict[str, Task], trainer: Trainer, run_dir: str, n: int) -> Iteration:
    it = Iteration(n)

    def start(stage: str, *args: Any) -> PrefectFuture:
        reason = it.skip_reason(stage)
        if reason is not None:
            it.blocked[stage] = reason
            return skipped.submit(stage, n, reason)
        return stages[stage].submit(run_dir, n, *args)

    def finish(stage: str, future: PrefectFuture) -> None:
        future.wait()
        it.record(stage, future.state)

    def run(stage: str, *args: Any) -> None:
        finish(stage, start(stage, *args))

    if trainer.due("evaluate", n):
        run("evaluate")
    run("collect")
    wm = start("train_world_model") if trainer.due("train_world_model", n) else None
    if wm is not None and not trainer.overlap_world_model:
        finish("train_world_model", wm)
    if trainer.due("adapt", n):
        run("adapt")
        run("ppo_train", it.artifacts.get("prompts"))
    elif trainer.due("train_llm", n):
        run("train_llm")
    if wm is not None and trainer.overlap_world_model:  # WM training overlapped the LLM stages above
        finish("train_world_model", wm)
    if trainer.due("checkpoint", n):
        run("checkpoint")
    return it


@dataclass
class Progress:
    last_ok: int = 0  # last iteration where every stage completed
    last_checkpoint: int = 0
    failed: list[int] = field(default_factory=list)
    evaluation: dict[str, float] = field(default_factory=dict)  # the latest evaluation's evals/* metrics
    best: float = -math.inf  # the best evaluation whose agent was logged

    def saw(self, row: dict[str, float]) -> None:
        if "evals/reward_mean" in row:
            self.evaluation = {k: v for k, v in row.items() if k.startswith("evals/") and k.count("/") == 1}

    def resumed(self, rows: list[dict[str, float]]) -> None:
        """Take the rows of a run being resumed (logs/metrics.jsonl): the latest evaluation, and as the best one
        whose agent was logged the highest that `log_best_agent` saw, one played on a checkpoint's weights
        (`evals/weights_iteration`) in an iteration that checkpointed. The first, untrained evaluation logged
        no agent and must not raise the bar a later best agent has to pass."""
        for row in rows:
            self.saw(row)
            if "evals/weights_iteration" in row and "timing/checkpoint_s" in row:
                self.new_best()

    def new_best(self) -> bool:
        """Whether the latest evaluation beats every one whose agent was logged (then it counts as logged)."""
        if self.evaluation.get("evals/reward_mean", -math.inf) <= self.best:
            return False
        self.best = self.evaluation["evals/reward_mean"]
        return True


def log_best_agent(cfg: PriorZeroConfig, trainer: Trainer, run_dir: Path, tracker: Tracker, progress: Progress,
                   n: int, evaluated: Optional[Path]) -> None:
    """At checkpoint `n`: when its latest evaluation is the run's best, export the agent that evaluation played and
    have MLflow log and register it (`tracking.log_models`). An iteration evaluates the weights its previous one
    trained, so the agent comes from the checkpoint that holds them (`evaluated`, the evaluate stage's
    `evaluated_checkpoint`), not from checkpoint `n`. An evaluation of weights no checkpoint holds (the first, of
    untrained weights; with `run.checkpoint_freq` > 1, some others) logs nothing."""
    if not (cfg.tracking.log_models and tracker.active and evaluated is not None and progress.new_best()):
        return
    from priorzero_core.agent_model import export_agent

    dest = run_dir / "agents" / f"iter-{n:06d}-{time.time_ns()}"  # the tracker deletes it once logged
    try:
        export_agent(evaluated, cfg, trainer.spec, dest, n, progress.evaluation)
    except OSError as err:  # tracking never stops training; e.g. run.keep_checkpoints 1 pruned `evaluated`
        logging.getLogger("priorzero").warning("agent of evaluation %d not logged: %s", n, err)
        return
    tracker.log_agent(n, dest)


def train(cfg: PriorZeroConfig, trainer: Trainer, run_dir: Path, tracker: Tracker, progress: Progress,
          logger: logging.LoggerAdapter, artifacts: RunArtifacts) -> None:
    stages = configured_stages(cfg.run)
    failed_in_row = 0
    for n in range(trainer.iteration + 1, cfg.schedule.iterations + 1):
        trainer.begin_iteration(n)
        it = run_iteration(stages, trainer, str(run_dir), n)
        failure = it.failure()
        row = trainer.finish_iteration(n, failed=failure is not None)  # the completed stages' metrics, as run_plain's
        tracker.log_iteration(n, row, it.artifacts, it.failure_row(failure))
        artifacts.iteration_done(n, row, it.artifacts.get("transcript"))
        progress.saw(row)
        if "checkpoint" in it.artifacts:
            progress.last_checkpoint = n
            tracker.commit()
            log_best_agent(cfg, trainer, run_dir, tracker, progress, n, it.artifacts.get("evaluated_checkpoint"))
        if failure is None:
            failed_in_row = 0
            progress.last_ok = n
            logger.info("iteration %d done in %.1f s; %s", n, row["timing/iteration_s"], artifacts.progress_line(n))
        else:
            failed_in_row += 1
            progress.failed.append(n)
            logger.warning("iteration %d failed at %s; the stages that need it were skipped", n, failure)
            if failed_in_row >= cfg.run.max_consecutive_failed_iterations:
                raise TrainingFailed(f"{failed_in_row} iterations in a row failed "
                                     f"(run.max_consecutive_failed_iterations); last: {failure}")
        if trainer.stop_after(n):
            break


def final_checkpoint(cfg: PriorZeroConfig, run_dir: Path, progress: Progress, tracker: Tracker) -> None:
    """When training stopped after an iteration that has no checkpoint (its checkpoint was skipped because a
    stage failed, or it was not due), checkpoint the models as that iteration left them. Not when it stopped
    inside an iteration (Ctrl-C, SIGTERM): the models then hold part of that iteration's work, and a resume
    from the last checkpoint runs it again."""
    trainer = trainer_for(run_dir)
    if trainer is None or trainer.iteration <= progress.last_checkpoint:
        return
    if trainer.in_iteration:
        logging.getLogger("priorzero").info(
            "no final checkpoint: training stopped inside an iteration; a resume starts after iteration %d",
            progress.last_checkpoint)
        return
    configured_stages(cfg.run)["checkpoint"](str(run_dir), trainer.iteration, return_state=True).result()
    progress.last_checkpoint = trainer.iteration
    tracker.commit()


def resolve_run(config: str, overrides: list[str], iterations: Optional[int], resume: bool,
                run_name: Optional[str], flow_run_id: Optional[str] = None) -> tuple[PriorZeroConfig, Path, bool]:
    """The validated config, the run directory and whether to resume; a resumed run reloads its own config.yaml.
    A flow run that trained a run directory before (Prefect's "Retry" runs the same flow run again) resumes it."""
    if iterations is not None:
        overrides = [*overrides, f"schedule.iterations={iterations}"]
    cfg = load_config(config, overrides)
    root = Path(cfg.run.run_dir).resolve()
    if not resume and flow_run_id is not None:
        earlier = trained_by(root, flow_run_id)
        if earlier is not None and (earlier / "config.yaml").is_file():
            resume, run_name = True, earlier.name
    if resume and not (run_name or cfg.run.name):
        raise ConfigError("resume needs run_name: the run directory's name under run.run_dir")
    name = run_name or cfg.run.name or f"{resolve_config_path(config).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if not is_plain_name(name):
        raise ConfigError(f"run name {name!r} must be a directory name under run.run_dir, without '/' or '..'")
    run_dir = root / name
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"cannot resume {run_dir}: it has no config.yaml")
        return load_config(saved, overrides), run_dir, True
    if (run_dir / "checkpoints").exists():
        raise ConfigError(f"run directory {run_dir} already has checkpoints: resume it or pick another run name")
    return cfg, run_dir, False


def flow_runs_of(run_dir: Path) -> list[str]:
    """The ids of the Prefect flow runs that trained `run_dir`, oldest first."""
    path = run_dir / FLOW_RUNS_FILE
    try:
        return [str(i) for i in json.loads(path.read_text())] if path.is_file() else []
    except ValueError:
        return []


def trained_by(root: Path, flow_run_id: str) -> Optional[Path]:
    """The run directory under `root` that flow run `flow_run_id` trained, if any."""
    if root.is_dir():
        for run_dir in sorted(root.iterdir()):
            if flow_run_id in flow_runs_of(run_dir):
                return run_dir
    return None


def take_over(run_dir: Path, flow_run_id: str, logger: logging.LoggerAdapter) -> None:
    """Record this flow run as the one training `run_dir`; refuse when another live process trains it. Earlier
    flow runs of it that the server still shows as running died without saying so (kill -9, a lost machine):
    they are marked Crashed."""
    lock = run_dir / TRAINING_PID_FILE
    try:
        holder = int(lock.read_text())
    except (OSError, ValueError):
        holder = None
    if holder is not None and holder != os.getpid() and psutil.pid_exists(holder):
        raise ConfigError(f"run directory {run_dir} is being trained by process {holder}; stop it before resuming")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    earlier = [i for i in flow_runs_of(run_dir) if i != flow_run_id]
    if earlier:
        with get_client(sync_client=True) as client:
            for run_id in earlier:
                try:
                    state = client.read_flow_run(UUID(run_id)).state
                    if state is not None and not state.is_final():
                        client.set_flow_run_state(UUID(run_id), Crashed(
                            message=f"its process died; flow run {flow_run_id} resumed its run dir"), force=True)
                        logger.info("flow run %s of this run dir was still %s: marked Crashed", run_id, state.name)
                except ObjectNotFound:  # another server's, or deleted
                    continue
    (run_dir / FLOW_RUNS_FILE).write_text(json.dumps([*earlier, flow_run_id]))


def flow_run_link() -> Optional[str]:
    """This flow run's page in the Prefect UI; None on Prefect's temporary server, whose UI is gone after the run
    (a link that cannot resolve is not written)."""
    return flow_run.ui_url if PREFECT_UI_URL.value() else None


def attach_log_file(path: Path) -> Callable[[], None]:
    """Copy flow, task and trainer log lines to `path`; returns the step that detaches it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(PrefectFormatter(
        format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
        flow_run_fmt="%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt="%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r - %(message)s",
    ))
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)

    def detach() -> None:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()

    return detach


def flow_run_name() -> str:
    """`<config>-<run name>` for a named run, else `<config>-<date>-<time>`: the config in every flow run's name."""
    params = flow_run.parameters
    config = Path(str(params.get("config", "debug"))).stem
    return f"{config}-{params.get('run_name') or f'{datetime.now():%Y%m%d-%H%M%S}'}"


@flow(name="priorzero", flow_run_name=flow_run_name, task_runner=ThreadPoolTaskRunner(max_workers=2),
      persist_result=False)
def priorzero(config: str = "debug", overrides: Optional[list[str]] = None, iterations: Optional[int] = None,
              resume: bool = False, run_name: Optional[str] = None) -> dict[str, Any]:
    """Train PriorZero. config: a name in configs/ or a YAML path; overrides: section.key=value items;
    iterations: last iteration to train (default schedule.iterations); resume: continue run_name's run dir."""
    logger = get_run_logger()
    cfg, run_dir, resume = resolve_run(config, overrides or [], iterations, resume, run_name, str(flow_run.id))
    check_inputs(cfg)  # whatever started this flow run: the CLI, a served or a work-pool deployment
    take_over(run_dir, str(flow_run.id), logger)
    detach_log = attach_log_file(run_dir / "logs" / "flow.log")
    logger.info("run dir %s (%s), %s mode, iterations up to %d", run_dir, "resumed" if resume else "new",
                cfg.schedule.mode, cfg.schedule.iterations)
    tracker = Tracker(cfg, run_dir, logger)
    progress = Progress()
    artifacts: Optional[RunArtifacts] = None
    status = "FAILED"
    try:
        tags = {"prefect.flow_run_id": str(flow_run.id), "priorzero.config": config, "priorzero.run_dir": str(run_dir)}
        if flow_run_link() is not None:
            tags["prefect.flow_run_url"] = flow_run_link()
        tracker.start(run_name=run_dir.name, tags=tags)  # in the background, while the trainer loads
        trainer = open_trainer(cfg, run_dir, resume=resume)
        progress.last_ok = progress.last_checkpoint = trainer.iteration
        if resume:  # checkpointed iterations whose process died before MLflow had them
            rows = read_metrics(run_dir)
            tracker.catch_up(rows)
            progress.resumed(rows)
        artifacts = RunArtifacts(cfg, run_dir.name, logger, trainer.iteration)
        artifacts.start()
        if tracker.wait_started():
            artifacts.mlflow_run(tracker.uri, tracker.experiment_id, tracker.run_id)
        train(cfg, trainer, run_dir, tracker, progress, logger, artifacts)
        status = "FINISHED"
    except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C; SIGTERM (Prefect's handler during a flow run)
        status = "KILLED"
        raise
    finally:
        # Independent steps: one failing is logged and the others still run.
        for what, step in (("final checkpoint", lambda: final_checkpoint(cfg, run_dir, progress, tracker)),
                           ("trainer close", lambda: close_trainer(run_dir)),
                           ("tracking end", lambda: tracker.end(status)),
                           ("run dir lock", lambda: (run_dir / TRAINING_PID_FILE).unlink(missing_ok=True)),
                           # the last updates, waiting less when killed (a worker's grace period is short)
                           ("Prefect artifacts", lambda: artifacts is not None and artifacts.close(
                               KILLED_CLOSE_TIMEOUT_S if status == "KILLED" else CLOSE_TIMEOUT_S)),
                           ("flow log", detach_log)):
            try:
                step()
            except Exception as err:
                logger.warning("cleanup: %s failed: %s: %s", what, type(err).__name__, err)
    return {"run_dir": str(run_dir), "last_iteration": progress.last_ok, "failed_iterations": progress.failed,
            "mlflow_run_id": tracker.run_id}

"""One Prefect task per training stage; each calls one Trainer method and returns its small StageResult.

The Trainer (models, envs, replay) is created once per flow run and kept in a process-level registry
keyed by run directory, so tasks only pass run dirs, iteration numbers and paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from priorzero_core.config import PriorZeroConfig, RunConfig
from priorzero_core.trainer import StageResult, Trainer

_trainers: dict[Path, Trainer] = {}


def open_trainer(cfg: PriorZeroConfig, run_dir: Path, *, resume: bool) -> Trainer:
    """Create the run's Trainer; stage tasks in this process find it by `run_dir`."""
    key = Path(run_dir).resolve()
    if key in _trainers:
        raise RuntimeError(f"a trainer for {key} is already open in this process")
    _trainers[key] = Trainer(cfg, key, resume=resume, progress=False)
    return _trainers[key]


def trainer_for(run_dir: Path) -> Optional[Trainer]:
    """The open trainer of `run_dir`, if any."""
    return _trainers.get(Path(run_dir).resolve())


def close_trainer(run_dir: Path) -> None:
    trainer = _trainers.pop(Path(run_dir).resolve(), None)
    if trainer is not None:
        trainer.close()


SKIPPED = "Skipped"  # the name of every skipped stage's state (its type is Completed), with the reason as message


def _run_stage(stage: str, run_dir: str, iteration: int, *args: object) -> StageResult | State:
    """The stage's result; a stage with nothing to do ends as a Completed state named Skipped, with the reason."""
    result = _trainers[Path(run_dir).resolve()].run_stage(stage, iteration, *args)
    if result.skipped is not None:
        return Completed(name=SKIPPED, message=f"{stage}-{iteration}: {result.skipped}", data=result)
    return result


# Stage results are small and live only for the flow run: no caching, no result storage.
_stage = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="evaluate", task_run_name="evaluate-{iteration}", **_stage)
def evaluate(run_dir: str, iteration: int) -> StageResult | State:
    return _run_stage("evaluate", run_dir, iteration)


@task(name="collect", task_run_name="collect-{iteration}", **_stage)
def collect(run_dir: str, iteration: int) -> StageResult | State:
    return _run_stage("collect", run_dir, iteration)


@task(name="train_world_model", task_run_name="train_world_model-{iteration}", **_stage)
def train_world_model(run_dir: str, iteration: int) -> StageResult | State:
    return _run_stage("train_world_model", run_dir, iteration)


@task(name="train_llm", task_run_name="train_llm-{iteration}", **_stage)
def train_llm(run_dir: str, iteration: int) -> StageResult | State:
    return _run_stage("train_llm", run_dir, iteration)


@task(name="adapt", task_run_name="adapt-{iteration}", **_stage)
def adapt(run_dir: str, iteration: int) -> StageResult | State:
    return _run_stage("adapt", run_dir, iteration)


@task(name="ppo_train", task_run_name="ppo_train-{iteration}", **_stage)
def ppo_train(run_dir: str, iteration: int, prompts: Path) -> StageResult | State:
    return _run_stage("ppo_train", run_dir, iteration, prompts)


@task(name="checkpoint", task_run_name="checkpoint-{iteration}", **_stage)
def checkpoint(run_dir: str, iteration: int) -> StageResult | State:
    return _run_stage("checkpoint", run_dir, iteration)


@task(name="skipped", task_run_name="{stage}-{iteration}", **_stage)
def skipped(stage: str, iteration: int, reason: str) -> State:
    """Stands in for a stage that did not run because one it depends on failed.

    Every stage that did not do its work, whether a stage it needs failed or it had nothing to do, ends in a
    Completed-type state named "Skipped" with the reason as its message: it does not fail the flow, it is never
    mistaken for a user's cancellation, and the UI's and API's state-name filters find all of them.
    """
    return Completed(name=SKIPPED, message=reason)


STAGE_TASKS: dict[str, Task] = {
    t.name: t for t in (evaluate, collect, train_world_model, train_llm, adapt, ppo_train, checkpoint)
}


def configured_stages(run: RunConfig) -> dict[str, Task]:
    """The stage tasks with this run's retries, retry delay and timeout."""
    return {
        name: t.with_options(
            retries=run.stage_retries,
            retry_delay_seconds=run.stage_retry_delay_s,
            timeout_seconds=run.stage_timeout_s,
        )
        for name, t in STAGE_TASKS.items()
    }

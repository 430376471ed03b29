"""MLflow tracking for flow runs: one experiment per game, one MLflow run per training run.

Training never waits on tracking: MLflow runs in a process of its own (`priorzero.mlflow_process`; importing
MLflow and opening its store cost ≈ 2 s of Python, which in the training process would hold the GIL against the
trainer), fed in call order by a background thread; if the store cannot be reached a single warning says so and
tracking stops for the rest of the flow run (a down server would otherwise cost HTTP retries every iteration).
`priorzero resume` reconnects to the same MLflow run, with steps continuing.

MLflow's own asynchronous logging (`synchronous=False`) queues metrics, params and tags but not artifacts, and
reports a failure only when its operation is waited on; the MLflow process keeps an iteration's metrics,
failures table, transcript and checkpoint reference in order and turns a dead store into one warning. Learning
curves are MLflow's metric charts (and `scripts/learning_curves.py` for a PNG of several runs).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import priorzero
import priorzero_core
from priorzero.mlflow_process import RUN_FILE, artifact_root, source_tags
from priorzero_core.config import PriorZeroConfig, dump_config
from priorzero_core.errors import first_line

__all__ = ["RUN_FILE", "Tracker", "TrackingFailure", "artifact_root", "experiment_name", "flatten", "package_version",
           "source_tags", "tracking_uri"]


def tracking_uri(cfg: PriorZeroConfig) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else one sqlite store under ./mlruns shared by all runs."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def experiment_name(cfg: PriorZeroConfig) -> str:
    return cfg.tracking.experiment or f"priorzero-{Path(cfg.game.name).stem}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"section.key": "value"} for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return flat


def package_version() -> str:
    """The installed priorzero's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("priorzero")
    except PackageNotFoundError:
        return "0.1.0"


class TrackingFailure(Exception):
    """An MLflow call that failed in the MLflow process: `kind` is its exception's class name."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Tracker:
    """Logs one training run to MLflow through the MLflow process, in call order, so training never waits on it.

    After tracking is disabled or a call has failed, every later call is a no-op (and the MLflow process ends).
    """

    def __init__(self, cfg: PriorZeroConfig, run_dir: Path, logger: logging.Logger | logging.LoggerAdapter):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = logger
        self.uri = tracking_uri(cfg)
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._started: Optional[Future] = None
        self._off = not cfg.tracking.enabled
        self._pending: list[tuple[int, dict[str, float], dict[str, Path], Optional[dict]]] = []  # see commit()
        # This thread hands the calls to the MLflow process one at a time and logs what they report.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-tracking")
        self._proc: Optional[subprocess.Popen] = None  # the MLflow process, started by the first call

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._off

    def start(self, *, run_name: str, tags: dict[str, str]) -> None:
        """Open (or on resume, reopen) this run dir's MLflow run and log the resolved config."""
        self._started = self._submit("start", lambda: self._start(run_name, tags))

    def wait_started(self, timeout: float = 30.0) -> bool:
        """Wait (at most `timeout` s) until `start` is done; whether the run is being tracked."""
        if self._started is None:
            return False
        try:
            self._started.result(timeout)
        except Exception:
            return False
        return self.active

    def log_iteration(self, iteration: int, metrics: dict[str, float], artifacts: dict[str, Path],
                      failure: Optional[dict[str, Any]] = None) -> None:
        """Hold one iteration's metrics, artifacts and failure (a row for the failures table) until `commit`:
        MLflow shows an iteration once a checkpoint holds it, so the iterations a resume runs again are never
        logged twice."""
        self._pending.append((iteration, dict(metrics), dict(artifacts), failure))

    def commit(self) -> None:
        """After a checkpoint: queue the iterations held, each as one batch of metrics (step = iteration) and then
        its artifacts and failure. Training does not wait for them (nor for a model logged before them): the
        checkpoint holds the metrics rows, and a resume after a kill -9 logs those MLflow lacks (`catch_up`)."""
        for iteration, metrics, artifacts, failure in self._pending:
            self._submit("logging", partial(self._log_metrics, iteration, metrics))
            self._submit("logging", partial(self._log_artifacts, iteration, artifacts, failure))
        self._pending = []

    def catch_up(self, rows: list[dict[str, float]], timeout: float = 60.0) -> None:
        """On resume: log the rows (logs/metrics.jsonl, up to the checkpoint) of iterations MLflow lacks, those
        whose process died between their checkpoint and `commit`; waits until they are written."""
        self._wait(self._submit("catch-up", partial(self._call, "catch_up", rows)), timeout)

    def _wait(self, written: Future, timeout: float) -> None:
        try:
            written.result(timeout)
        except Exception as err:  # a slow store: train on, the queue still drains in the background
            self.log.warning("MLflow tracking is %s behind; training goes on", type(err).__name__)

    def end(self, status: str, timeout: float = 120.0) -> None:
        """Mark the run FINISHED, FAILED or KILLED and wait (at most `timeout` s, then the MLflow process is
        killed) until everything queued is written. Iterations held but never checkpointed are not sent (a
        resume runs them again)."""
        if self._pending:
            self.log.info("MLflow: iterations %s not logged: no checkpoint holds them",
                          ", ".join(str(p[0]) for p in self._pending))
            self._pending = []
        if self._started is not None:
            self._wait(self._submit("end", partial(self._call, "end", status)), timeout)
        self._stop(timeout=10)  # it exits once its stdin closes; a call still waiting on it gets its end of file
        self._worker.shutdown(wait=True)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()  # nothing reads its replies any more

    def log_agent(self, iteration: int, agent_dir: Path) -> None:
        """Log an exported agent (`priorzero_core.agent_model.export_agent`) as this run's MLflow model `agent`,
        register it as a new version of `registered_model_name` with the alias `best`, then delete `agent_dir`."""
        self._submit("model logging", partial(self._call, "log_agent", iteration, str(agent_dir),
                                              self.registered_model_name, f"priorzero=={package_version()}"))

    @property
    def registered_model_name(self) -> str:
        return f"priorzero-{Path(self.cfg.game.name).stem}"

    def _submit(self, what: str, call: Callable[[], None]) -> Future:
        # The caller's context goes along: Prefect keeps its settings and run context in context variables,
        # which the messages this thread logs to a flow run's logger need.
        return self._worker.submit(contextvars.copy_context().run, self._guard, what, call)

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        if self._off:
            return
        try:
            call()
        except Exception as err:  # any tracking failure: warn once, then train on without it
            self._off = True
            self.log.warning("MLflow tracking at %s failed during %s (%s: %s); training continues without tracking",
                             self.uri, what, getattr(err, "kind", type(err).__name__), first_line(err))
            self._stop(timeout=10)

    def _call(self, method: str, *args: Any) -> Any:
        """`MLflowStore.<method>(*args)` in the MLflow process (started by the first call): logs what it reported
        and returns its result; its failure, or the process's end, is raised as a TrackingFailure."""
        if self._proc is None:
            # A process group of its own: Ctrl-C and a SIGTERM to the training process's group leave it running.
            # It imports the priorzero and priorzero_core this process runs, wherever they were found.
            here = [str(Path(module.__file__).resolve().parents[1]) for module in (priorzero, priorzero_core)]
            paths = [*here, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if p))}
            self._proc = subprocess.Popen([sys.executable, "-m", "priorzero.mlflow_process", str(os.getpid())],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                          env=env, process_group=0)
            self._request("open", {
                "uri": self.uri, "run_dir": str(self.run_dir), "experiment": experiment_name(self.cfg),
                "params": flatten(self.cfg.model_dump(mode="json")), "config_yaml": dump_config(self.cfg),
                "code_dir": str(Path(priorzero_core.__file__).parent),  # the checkout that trains
                "system_metrics": self.cfg.tracking.system_metrics,
                "system_metrics_interval_s": self.cfg.tracking.system_metrics_interval_s})
        return self._request(method, *args)

    def _request(self, method: str, *args: Any) -> Any:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"method": method, "args": args}, default=str) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (OSError, ValueError):  # its pipes are closed: it ended
            line = ""
        if not line:
            raise TrackingFailure("ProcessExited", f"the MLflow process ended (exit code {proc.poll()})")
        reply = json.loads(line)
        for level, text in reply["messages"]:
            self.log.log(level, "%s", text)
        if reply["failure"] is not None:
            raise TrackingFailure(*reply["failure"])
        return reply["result"]

    def _stop(self, timeout: float) -> None:
        """End the MLflow process: its stdin closed, it exits (killed if it has not after `timeout` s)."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # One method per call the tracking thread makes (tests intercept them here).
    def _start(self, run_name: str, tags: dict[str, str]) -> None:
        self.run_id, self.experiment_id = self._call("start", run_name, tags)

    def _log_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        self._call("log_metrics", iteration, metrics)

    def _log_artifacts(self, iteration: int, artifacts: dict[str, Path], failure: Optional[dict[str, Any]] = None) -> None:
        self._call("log_artifacts", iteration, {k: str(v) for k, v in artifacts.items()}, failure)

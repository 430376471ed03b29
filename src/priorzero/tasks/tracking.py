"""MLflow tracking for flow runs: one experiment per game, one MLflow run per training run.

Training never waits on tracking: calls run on a background thread, and if the store cannot be reached a
single warning says so and tracking stops for the rest of the flow run (a down server would otherwise cost
HTTP retries every iteration). `priorzero resume` reconnects to the same MLflow run, with steps continuing.

MLflow's own asynchronous logging (`synchronous=False`) queues metrics, params and tags but not artifacts, and
reports a failure only when its operation is waited on; this thread keeps an iteration's metrics, failures
table, transcript and checkpoint reference in order and turns a dead store into one warning. Learning curves
are MLflow's metric charts (and `scripts/learning_curves.py` for a PNG of several runs).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import shutil
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from priorzero_core.config import PriorZeroConfig, dump_config

RUN_FILE = "mlflow_run.json"  # in the run dir: which MLflow run a resume continues
CHANGED_TAG = "priorzero.config."  # + a config key: its value since a resume changed it
STEP_METRIC = "timing/iteration_s"  # in every iteration's row: the steps it has are the iterations logged
FAILURES_TABLE = "failures.json"  # one row per iteration that had a failed stage: which, why, what it skipped


def tracking_uri(cfg: PriorZeroConfig) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else one sqlite store under ./mlruns shared by all runs."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a sqlite store sit beside its file; a tracking server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


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


def source_tags() -> dict[str, str]:
    """`mlflow.source.git.*` of the checkout priorzero_core runs from; none for an installed package."""
    import priorzero_core
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    where = str(Path(priorzero_core.__file__).parent)
    found = {MLFLOW_GIT_COMMIT: get_git_commit(where), MLFLOW_GIT_BRANCH: get_git_branch(where),
             MLFLOW_GIT_REPO_URL: get_git_repo_url(where)}
    return {k: v for k, v in found.items() if v}


def _check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        # Without this, MLflow's own HTTP retries stall the run for minutes on a down server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3):
            pass
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


class Tracker:
    """Logs one training run to MLflow from a background thread, in call order, so training never waits on it.

    After tracking is disabled or a call has failed, every later call is a no-op.
    """

    def __init__(self, cfg: PriorZeroConfig, run_dir: Path, logger: logging.Logger | logging.LoggerAdapter):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = logger
        self.uri = tracking_uri(cfg)
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._started: Optional[Future] = None
        self._off = not cfg.tracking.enabled
        self._pending: list[tuple[int, dict[str, float], dict[str, Path], Optional[dict]]] = []  # see commit()
        self._system: Any = None  # MLflow's SystemMetricsMonitor while the run trains
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-tracking")

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

    def commit(self, timeout: float = 60.0) -> None:
        """After a checkpoint: send the iterations held, each as one batch of metrics (step = iteration) and
        then its artifacts and failure, and wait (at most `timeout` s) until the metrics are written. A kill -9 before
        they are is made good by `catch_up` on resume; the artifacts (transcript, checkpoint reference) may
        still be on their way."""
        written = None
        for iteration, metrics, artifacts, failure in self._pending:
            written = self._submit("logging", partial(self._log_metrics, iteration, metrics))
            self._submit("logging", partial(self._log_artifacts, iteration, artifacts, failure))
        self._pending = []
        if written is not None:
            self._wait(written, timeout)

    def catch_up(self, rows: list[dict[str, float]], timeout: float = 60.0) -> None:
        """On resume: log the rows (logs/metrics.jsonl, up to the checkpoint) of iterations MLflow lacks, those
        whose process died between their checkpoint and `commit`; waits until they are written."""
        def log_missing() -> None:
            logged = {m.step for m in self.client.get_metric_history(self.run_id, STEP_METRIC)}
            for row in rows:
                metrics = {k: v for k, v in row.items() if k != "iteration"}
                if int(row["iteration"]) not in logged:
                    self._log_metrics(int(row["iteration"]), metrics)
        self._wait(self._submit("catch-up", log_missing), timeout)

    def _wait(self, written: Future, timeout: float) -> None:
        try:
            written.result(timeout)
        except Exception as err:  # a slow store: train on, the queue still drains in the background
            self.log.warning("MLflow tracking is %s behind; training goes on", type(err).__name__)

    def end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED and wait until everything queued is written. Iterations held
        but never checkpointed are not sent (a resume runs them again)."""
        if self._pending:
            self.log.info("MLflow: iterations %s not logged: no checkpoint holds them",
                          ", ".join(str(p[0]) for p in self._pending))
            self._pending = []
        self._submit("end", lambda: self._end(status))
        self._worker.shutdown(wait=True)

    def _end(self, status: str) -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.client.set_terminated(self.run_id, status=status)

    def _submit(self, what: str, call: Callable[[], None]) -> Future:
        # The caller's context goes along: Prefect keeps its settings and run context in context variables.
        return self._worker.submit(contextvars.copy_context().run, self._guard, what, call)

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        if self._off:
            return
        try:
            call()
        except Exception as err:  # any tracking failure: warn once, then train on without it
            self._off = True
            self.log.warning("MLflow tracking at %s failed during %s (%s: %s); training continues without tracking",
                             self.uri, what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    def _start(self, run_name: str, tags: dict[str, str]) -> None:
        _check_reachable(self.uri)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment_id()
        run_id = self._previous_run_id()
        resumed = run_id is not None
        if resumed:
            self.client.update_run(run_id, status="RUNNING")
            known = self.client.get_run(run_id).data.params
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
            (self.run_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": self.uri, "run_id": run_id}))
            known = {}
        self.run_id = run_id
        self._log_config(known, tags)
        if self.cfg.tracking.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(run_id, sampling_interval=self.cfg.tracking.system_metrics_interval_s,
                                                resume_logging=resumed, tracking_uri=self.uri)
            self._system.start()
        self.log.info("MLflow run %s in experiment %s at %s", run_id, experiment_name(self.cfg), self.uri)

    def _previous_run_id(self) -> Optional[str]:
        path = self.run_dir / RUN_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") != self.uri:
            self.log.warning("this run was tracked at %s; now tracking at %s in a new MLflow run",
                             saved.get("tracking_uri"), self.uri)
            return None
        return saved["run_id"]

    def _experiment_id(self) -> str:
        name = experiment_name(self.cfg)
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        root = artifact_root(self.uri)
        # The kind tag makes the MLflow UI open on the runs table and metric charts, not on GenAI traces.
        return self.client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                             tags={"mlflow.experimentKind": "custom_model_development"})

    def log_agent(self, iteration: int, agent_dir: Path) -> None:
        """Log an exported agent (`priorzero_core.agent_model.export_agent`) as this run's MLflow model `agent`,
        register it as a new version of `registered_model_name` with the alias `best`, then delete `agent_dir`."""
        self._submit("model logging", partial(self._log_agent, iteration, Path(agent_dir)))

    @property
    def registered_model_name(self) -> str:
        return f"priorzero-{Path(self.cfg.game.name).stem}"

    def _log_agent(self, iteration: int, agent_dir: Path) -> None:
        import tempfile

        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        from priorzero_core.agent_model import AGENT_FILE, PriorZeroAgentModel

        try:
            info = json.loads((agent_dir / AGENT_FILE).read_text())
            with tempfile.TemporaryDirectory() as tmp:
                model = Path(tmp) / "agent"
                mlflow.pyfunc.save_model(str(model), python_model=PriorZeroAgentModel(), artifacts={"agent": str(agent_dir)},
                                         pip_requirements=[f"priorzero=={package_version()}"],
                                         metadata={"iteration": iteration, "evaluation": info["evaluation"]})
                self.client.log_artifacts(self.run_id, str(model), "agent")
            name = self.registered_model_name
            try:
                self.client.create_registered_model(name, description="PriorZero agents: world model, trained LLM "
                                                    "weights and config; @best is the best evaluation")
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            tags = {"iteration": str(iteration), **{k: str(v) for k, v in info["evaluation"].items()}}
            version = self.client.create_model_version(name, f"runs:/{self.run_id}/agent", run_id=self.run_id, tags=tags)
            self.client.set_registered_model_alias(name, "best", version.version)
            self.log.info("MLflow model %s version %s (iteration %d) is now @best", name, version.version, iteration)
        except Exception as err:  # a registry that refuses the model must not stop the metrics (see _guard)
            self.log.warning("MLflow: the agent of iteration %d was not registered (%s: %s)", iteration,
                             type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        finally:
            shutil.rmtree(agent_dir, ignore_errors=True)

    def _log_config(self, known: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking.context.registry import resolve_tags

        # What mlflow.start_run adds (user, source), and the commit of the code that trains (MLflow looks for it
        # beside the script that started the process, which under Prefect or pytest is not this code's checkout):
        # from this process, so a resume records its own.
        tags = resolve_tags({**source_tags(), **tags})
        # MLflow params are immutable: on resume new keys are added, and a value the resume changed goes into a
        # tag `priorzero.config.<key>` (the param keeps the first value); config.yaml holds the current ones.
        flat = {k: v[:6000] for k, v in flatten(self.cfg.model_dump(mode="json")).items()}
        params = [Param(k, v) for k, v in flat.items() if k not in known]
        tags = {**tags, **{f"{CHANGED_TAG}{k}": v[:5000] for k, v in flat.items() if k in known and known[k] != v}}
        self.client.log_batch(self.run_id, params=params[:100], tags=[RunTag(k, v) for k, v in tags.items()])
        for i in range(100, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, dump_config(self.cfg), "config.yaml")

    def _log_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, iteration) for key, value in sorted(metrics.items())]
        self.client.log_batch(self.run_id, metrics=batch)

    def _log_artifacts(self, iteration: int, artifacts: dict[str, Path], failure: Optional[dict[str, Any]] = None) -> None:
        if failure is not None:  # MLflow appends the row to the table
            self.client.log_table(self.run_id, {k: [v] for k, v in failure.items()}, FAILURES_TABLE)
        if "transcript" in artifacts:
            self.client.log_artifact(self.run_id, str(artifacts["transcript"]), "transcripts")
        if "checkpoint" in artifacts:
            ref = {"iteration": iteration, "path": str(Path(artifacts["checkpoint"]).resolve())}
            self.client.log_dict(self.run_id, ref, "checkpoint.json")
            self.client.set_tag(self.run_id, "latest_checkpoint", ref["path"])

"""The MLflow process: one training run's MLflow calls, made outside the training process.

`priorzero.tasks.tracking.Tracker` starts it (`python -m priorzero.mlflow_process PARENT_PID`, in a process group of
its own) and sends it one JSON request a line on stdin, `{"method": ..., "args": [...]}`; it answers each with one
JSON line on stdout, `{"result": ..., "messages": [[level, text], ...], "failure": [class name, first line] | null}`,
in order. The first request is `open`. Importing MLflow and opening its store cost ≈ 2 s of Python: here they
do not hold the training process's GIL. It imports nothing of the trainer (torch only to log an agent).

It ends when its stdin closes or its parent is gone, however the parent ended (a kill -9 leaves no process that
would go on logging system metrics); Ctrl-C and a SIGTERM to the training process's group do not reach it, so
the training process can still end the MLflow run with the status they mean.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from priorzero_core.errors import first_line

RUN_FILE = "mlflow_run.json"  # in the run dir: which MLflow run a resume continues
CHANGED_TAG = "priorzero.config."  # + a config key: its value since a resume changed it
STEP_METRIC = "timing/iteration_s"  # in every iteration's row: the steps it has are the iterations logged
FAILURES_TABLE = "failures.json"  # one row per iteration that had a failed stage: which, why, what it skipped


def artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a sqlite store sit beside its file; a tracking server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def source_tags(where: Optional[str] = None) -> dict[str, str]:
    """`mlflow.source.git.*` of the checkout at `where` (default: the one priorzero_core runs from); none for an
    installed package."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    if where is None:
        import priorzero_core

        where = str(Path(priorzero_core.__file__).parent)
    found = {MLFLOW_GIT_COMMIT: get_git_commit(where), MLFLOW_GIT_BRANCH: get_git_branch(where),
             MLFLOW_GIT_REPO_URL: get_git_repo_url(where)}
    return {k: v for k, v in found.items() if v}


def check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        # Without this, MLflow's own HTTP retries stall the run for minutes on a down server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3):
            pass
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def agent_artifact_path(iteration: int) -> str:
    """Where in its run the agent of the evaluation at `iteration` is logged (each version of the registered model
    points at its own)."""
    return f"agents/iter-{iteration:06d}"


class MLflowStore:
    """One training run's MLflow run: what each of the Tracker's requests does.

    `params` are the resolved config flattened ("section.key" → value), `config_yaml` the config as YAML,
    `code_dir` the checkout whose git commit the run records."""

    CALLS = ("start", "log_metrics", "log_artifacts", "catch_up", "log_agent", "end")

    def __init__(self, uri: str, run_dir: str, experiment: str, params: dict[str, str], config_yaml: str,
                 code_dir: str, system_metrics: bool, system_metrics_interval_s: float):
        self.uri = uri
        self.run_dir = Path(run_dir)
        self.experiment = experiment
        self.params = params
        self.config_yaml = config_yaml
        self.code_dir = code_dir
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.messages: list[tuple[int, str]] = []  # (level, text): the Tracker logs them
        self._system: Any = None  # MLflow's SystemMetricsMonitor while the run trains

    def _say(self, level: int, text: str) -> None:
        self.messages.append((level, text))

    def start(self, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
        """Open (or on resume, reopen) the run dir's MLflow run and log the config; (run id, experiment id)."""
        check_reachable(self.uri)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment_id()
        run_id = self._previous_run_id()
        resumed = run_id is not None
        if resumed:
            self.client.update_run(run_id, status="RUNNING")
            known = self.client.get_run(run_id).data.params
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            (self.run_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": self.uri, "run_id": run_id}))
            known = {}
        self.run_id = run_id
        self._log_config(known, tags)
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(run_id, sampling_interval=self.system_metrics_interval_s,
                                                resume_logging=resumed, tracking_uri=self.uri)
            self._system.start()
        self._say(logging.INFO, f"MLflow run {run_id} in experiment {self.experiment} at {self.uri}")
        return run_id, experiment_id

    def end(self, status: str) -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.client.set_terminated(self.run_id, status=status)

    def _previous_run_id(self) -> Optional[str]:
        path = self.run_dir / RUN_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") != self.uri:
            self._say(logging.WARNING, f"this run was tracked at {saved.get('tracking_uri')}; now tracking at "
                                       f"{self.uri} in a new MLflow run")
            return None
        return saved["run_id"]

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        root = artifact_root(self.uri)
        # The kind tag makes the MLflow UI open on the runs table and metric charts, not on GenAI traces.
        return self.client.create_experiment(self.experiment,
                                             artifact_location=f"{root}/{self.experiment}" if root else None,
                                             tags={"mlflow.experimentKind": "custom_model_development"})

    def _log_config(self, known: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking.context.registry import resolve_tags

        # What mlflow.start_run adds (user, source), and the commit of the code that trains (MLflow looks for it
        # beside the script that started the process, which is not this code's checkout under Prefect or pytest).
        tags = resolve_tags({**source_tags(self.code_dir), **tags})
        # MLflow params are immutable: on resume new keys are added, and a value the resume changed goes into a
        # tag `priorzero.config.<key>` (the param keeps the first value); config.yaml holds the current ones.
        flat = {k: v[:6000] for k, v in self.params.items()}
        params = [Param(k, v) for k, v in flat.items() if k not in known]
        tags = {**tags, **{f"{CHANGED_TAG}{k}": v[:5000] for k, v in flat.items() if k in known and known[k] != v}}
        self.client.log_batch(self.run_id, params=params[:100], tags=[RunTag(k, v) for k, v in tags.items()])
        for i in range(100, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, self.config_yaml, "config.yaml")

    def log_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, iteration) for key, value in sorted(metrics.items())]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, iteration: int, artifacts: dict[str, str], failure: Optional[dict[str, Any]] = None) -> None:
        if failure is not None:  # MLflow appends the row to the table
            self.client.log_table(self.run_id, {k: [v] for k, v in failure.items()}, FAILURES_TABLE)
        if "transcript" in artifacts:
            self.client.log_artifact(self.run_id, artifacts["transcript"], "transcripts")
        if "checkpoint" in artifacts:
            ref = {"iteration": iteration, "path": str(Path(artifacts["checkpoint"]).resolve())}
            self.client.log_dict(self.run_id, ref, "checkpoint.json")
            self.client.set_tag(self.run_id, "latest_checkpoint", ref["path"])

    def catch_up(self, rows: list[dict[str, float]]) -> None:
        """Log the rows of the iterations the MLflow run lacks."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, STEP_METRIC)}
        for row in rows:
            if int(row["iteration"]) not in logged:
                self.log_metrics(int(row["iteration"]), {k: v for k, v in row.items() if k != "iteration"})

    def log_agent(self, iteration: int, agent_dir: str, name: str, requirement: str) -> None:
        """Log the exported agent at `agent_dir` as the run's MLflow model `agents/iter-NNNNNN` (the evaluation's
        iteration), register it as a new version of `name`, give it the alias `best` unless the version @best
        already points at (of this run or another) evaluated higher, then delete `agent_dir`. A registry that
        refuses it is a warning."""
        import tempfile

        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        from priorzero_core.agent_model import AGENT_FILE, PriorZeroAgentModel

        path = agent_artifact_path(iteration)  # a path of its own: a later version must not overwrite this one
        try:
            info = json.loads((Path(agent_dir) / AGENT_FILE).read_text())
            with tempfile.TemporaryDirectory() as tmp:
                model = Path(tmp) / "agent"
                mlflow.pyfunc.save_model(str(model), python_model=PriorZeroAgentModel(), artifacts={"agent": agent_dir},
                                         pip_requirements=[requirement],
                                         metadata={"iteration": iteration, "evaluation": info["evaluation"]})
                self.client.log_artifacts(self.run_id, str(model), path)
            try:
                self.client.create_registered_model(name, description="PriorZero agents: world model, trained LLM "
                                                    "weights and config; @best is the best evaluation")
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            tags = {"iteration": str(iteration), "checkpoint": str(info.get("checkpoint", "")),
                    **{k: str(v) for k, v in info["evaluation"].items()}}
            version = self.client.create_model_version(name, f"runs:/{self.run_id}/{path}", run_id=self.run_id, tags=tags)
            held = self._best_score(name)
            score = info["evaluation"].get("evals/reward_mean")
            if held is not None and score is not None and float(score) < held:  # another run's agent scored more
                self._say(logging.INFO, f"MLflow model {name} version {version.version} (iteration {iteration}, "
                                        f"{float(score):g}); @best stays on a version that scored {held:g}")
                return
            self.client.set_registered_model_alias(name, "best", version.version)
            self._say(logging.INFO, f"MLflow model {name} version {version.version} (iteration {iteration}) is now @best")
        except Exception as err:  # a registry that refuses the model must not stop the metrics
            self._say(logging.WARNING, f"MLflow: the agent of iteration {iteration} was not registered "
                                       f"({type(err).__name__}: {first_line(err)})")
        finally:
            shutil.rmtree(agent_dir, ignore_errors=True)


    def _best_score(self, name: str) -> Optional[float]:
        """The evaluation (`evals/reward_mean`) of the version of `name` at @best, if any."""
        from mlflow.exceptions import MlflowException

        try:
            held = self.client.get_model_version_by_alias(name, "best")
        except MlflowException:  # no @best yet
            return None
        value = held.tags.get("evals/reward_mean")
        return float(value) if value is not None else None


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)  # the training process is gone, whatever this process was doing


def serve(requests, replies, parent: int) -> None:
    """Answer `requests` (lines of JSON) on `replies`, in order, until they end."""
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    store: Optional[MLflowStore] = None
    for line in requests:
        request = json.loads(line)
        method, args = request["method"], request["args"]
        result, failure = None, None
        try:
            if method == "open":
                store = MLflowStore(**args[0])
            elif store is None or method not in MLflowStore.CALLS:
                raise ValueError(f"unknown request {method!r}" if store else f"{method!r} before open")
            else:
                result = getattr(store, method)(*args)
        except Exception as err:
            failure = [type(err).__name__, first_line(err)]
        messages = store.messages if store is not None else []
        if store is not None:
            store.messages = []
        replies.write(json.dumps({"result": result, "messages": messages, "failure": failure}, default=str) + "\n")
        replies.flush()


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what MLflow prints goes to stderr, never among the replies
    serve(sys.stdin, replies, int(sys.argv[1]))
    os._exit(0)  # no waiting on MLflow's threads: the run is ended by its request, or left for a resume


if __name__ == "__main__":
    main()

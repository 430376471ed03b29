"""Reliability helpers: run the `priorzero` command in its own session, hash what a run has saved, read MLflow."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

PRIORZERO = str(Path(sys.executable).with_name("priorzero"))


def saved_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file in a complete checkpoint and every replay file: what a crash must never touch. A
    replay file a resume renamed aside (its iteration runs again) counts under its own name."""
    files = [*run_dir.glob("checkpoints/iter-*/**/*"), *run_dir.glob("replay/iter-*.jsonl.gz*")]
    return {str(p.relative_to(run_dir)).split(".after-checkpoint-")[0]: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.is_file()}


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of a session: a command started with start_new_session and everything it started."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def wait_gone(sid: int, timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (alive := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return alive


@pytest.fixture
def priorzero_cli(prefect_server, tmp_path):
    """Run `priorzero ARGS` against the session's Prefect server with extra env vars; returns (returncode,
    output, session id) and kills whatever the command left behind after the test."""
    sessions: list[int] = []

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str, int]:
        full_env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-client"),
                    **(env or {})}
        proc = subprocess.Popen([PRIORZERO, *args], env=full_env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        sessions.append(proc.pid)
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output, proc.pid

    yield run
    for sid in sessions:
        for proc in session_processes(sid):
            proc.kill()


def metric_steps(tracking_uri: str, key: str) -> list[int]:
    """Steps of `key` in the one MLflow run of the embedded game's experiment, in logged order."""
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("priorzero-embedded").experiment_id])
    return [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)]


def tracking_uri(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri="))

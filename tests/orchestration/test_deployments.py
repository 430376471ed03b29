"""End to end: a real `prefect server start`, `priorzero serve`, and `prefect deployment run priorzero/debug`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

BIN = Path(sys.executable).parent


def wait_for_deployment(name: str, serve: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert serve.poll() is None, "priorzero serve exited"
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                time.sleep(0.5)
    raise AssertionError(f"deployment {name} not registered after {timeout:.0f} s")


def test_served_debug_deployment_runs_to_completed(prefect_api, debug_overrides, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen([str(BIN / "priorzero"), "serve", "--poll-seconds", "1"], env=env, cwd=tmp_path,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for name in ("priorzero/debug", "priorzero/zork", "priorzero/detective"):
            wait_for_deployment(name, serve)
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "priorzero/debug", "--param", "iterations=2",
             "--param", f"overrides={json.dumps(debug_overrides)}", "--watch", "--watch-timeout", "400"],
            env=env, capture_output=True, text=True, timeout=450)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()

    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
    assert "Completed" in output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "iter-000002").is_dir()

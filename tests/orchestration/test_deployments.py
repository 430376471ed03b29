"""End to end: a real `prefect server start`, `priorzero serve`, and `prefect deployment run priorzero/debug`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def wait_for_deployment(env: dict[str, str], name: str, serve: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert serve.poll() is None, "priorzero serve exited"
        found = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", name], env=env, capture_output=True)
        if found.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"deployment {name} not registered after {timeout:.0f} s")


@pytest.mark.slow
def test_served_debug_deployment_runs_to_completed(prefect_server, debug_overrides, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([str(BIN / "priorzero"), "serve", "--poll-seconds", "1"], env=env, cwd=tmp_path,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_deployment(env, "priorzero/debug", serve)
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
        log.close()

    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
    assert "Completed" in output
    for deployment in ("zork", "detective"):
        assert f"priorzero/{deployment}" in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "runs").is_dir()

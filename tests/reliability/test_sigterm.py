"""SIGTERM to `priorzero train` (a scheduler stopping the job) unwinds like Ctrl-C.

With no Prefect server configured the command starts Prefect's temporary server as a child process; a plain
SIGTERM used to kill the command and orphan that server. Now the flow's cleanup runs: every process of the
command's session is gone, the MLflow run is KILLED (not left RUNNING) and the exit status is 130.
"""

import os
import signal
import subprocess
import time

from mlflow import MlflowClient

from priorzero_core import checkpoint as ckpt

from .conftest import PRIORZERO, session_processes, wait_gone


def test_sigterm_stops_the_run_its_temporary_server_and_marks_mlflow_killed(prefect_home, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(prefect_home)  # its own temporary server and database
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([PRIORZERO, "train", "debug", "--run-dir", str(run_dir), "--set", "llm.enabled=false",
                             "collect.steps_per_iteration=5", "mcts.num_simulations=2", "eval.max_episode_steps=5",
                             f"tracking.uri={uri}"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while ckpt.latest_valid(run_dir / "checkpoints") is None and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0]
        assert len(session_processes(proc.pid)) >= 2  # the command and Prefect's temporary server

        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hung: the command's own last lines
            for left in session_processes(proc.pid):
                left.kill()
            raise AssertionError("still running 120 s after SIGTERM:\n" + proc.communicate()[0][-4000:]) from None

        assert proc.returncode == 130, output
        assert "Stopping temporary server" in output
        assert not wait_gone(proc.pid), "processes left behind"
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("priorzero-embedded").experiment_id])
        assert run.info.status == "KILLED"
        assert "prefect.flow_run_url" not in run.data.tags  # the temporary server's UI is gone with it
        assert ckpt.latest_valid(run_dir / "checkpoints") is not None  # what was saved is still there
    finally:
        for left in session_processes(proc.pid):
            left.kill()

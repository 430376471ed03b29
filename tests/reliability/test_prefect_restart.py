"""The Prefect server dies mid-run and comes back: training never waits for it and the flow run ends Completed.

`priorzero train` runs against its own `prefect server start` on 127.0.0.1; after the first checkpoint the
server is stopped, and started again on the same port and PREFECT_HOME a few seconds later. The command
exits 0, every checkpoint verifies, and the restarted server shows the flow run Completed.
"""

import os
import subprocess
import time

from servers import free_port, prefect_server
from priorzero_core import checkpoint as ckpt

from .conftest import PRIORZERO, session_processes, wait_gone


def test_a_prefect_server_restart_mid_run_costs_no_iteration_and_the_run_completes(debug_overrides, prefect_home,
                                                                                   tmp_path):
    port, home = free_port(), prefect_home
    run_dir = tmp_path / "run"
    overrides = [o for o in debug_overrides if not o.startswith("run.run_dir=")]
    with prefect_server(home, port) as url:
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "client")}
        proc = subprocess.Popen([PRIORZERO, "train", "debug", "--iterations", "6", "--run-dir", str(run_dir),
                                 "--set", *overrides], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 300
        while ckpt.latest_valid(run_dir / "checkpoints") is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.3)
    try:
        down_at = ckpt.latest_valid(run_dir / "checkpoints")[1]["meta"]["iteration"]
        time.sleep(3)
        with prefect_server(home, port):
            output, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, output[-3000:]
            assert "trained to iteration 6" in output
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
                (flow_run,) = client.read_flow_runs()
                assert flow_run.state.is_completed(), flow_run.state
    finally:
        for left in session_processes(proc.pid):
            left.kill()
    assert not wait_gone(proc.pid)
    iterations = [ckpt.verify(p)["meta"]["iteration"] for p in ckpt.list_checkpoints(run_dir / "checkpoints")]
    assert iterations[-1] == 6 and down_at < 6

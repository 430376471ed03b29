"""Resource hygiene: Ctrl-C of a training run leaves no process and no broken checkpoint; memory stays flat."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from interrupts import ctrl_c_as_in_a_terminal

from priorzero_core import checkpoint as ckpt

from .conftest import PRIORZERO, wait_gone

REPO = Path(__file__).resolve().parents[2]


def test_ctrl_c_mid_run_stops_every_process_and_keeps_checkpoints_valid(prefect_server, debug_overrides, tmp_path):
    run_dir = tmp_path / "runs" / "interrupted"
    overrides = [o for o in debug_overrides if not o.startswith("run.run_dir=")]
    env = {"PATH": str(Path(sys.executable).parent), "PREFECT_API_URL": prefect_server,
           "PREFECT_HOME": str(tmp_path / "prefect-client"), "HOME": str(Path.home())}
    proc = subprocess.Popen([PRIORZERO, "train", "debug", "--iterations", "50", "--run-dir", str(run_dir), "--set",
                             *overrides], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "iter-000002").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output[-3000:]
    assert not wait_gone(proc.pid), "processes outlived the interrupted run"
    assert ckpt.latest_valid(run_dir / "checkpoints")[1]["meta"]["iteration"] >= 2
    assert all(ckpt.verify(p) for p in ckpt.list_checkpoints(run_dir / "checkpoints"))


@pytest.mark.slow
def test_rss_is_flat_over_100_debug_iterations(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "memory_soak.py"), "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=1800).stdout
    rss = {int(it): float(mb) for it, mb in re.findall(r"iteration\s+(\d+): RSS\s+([\d.]+) MiB", out)}
    assert sorted(rss) == list(range(10, 101, 10)), out
    assert rss[100] < 1.2 * rss[10], out  # the replay (500 steps here) is all that should grow
    assert len((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()) == 100
    assert json.loads((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 100

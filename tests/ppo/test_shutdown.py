import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
from interrupts import ctrl_c_as_in_a_terminal

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from priorzero_core.config import PriorZeroConfig
    from priorzero_core.ppo import PPOTrainer
    from priorzero_core.replay import GameSegment

    cfg = PriorZeroConfig.model_validate_json(Path(sys.argv[1]).read_text())
    segment = GameSegment.from_json(Path(sys.argv[2]).read_text())
    with PPOTrainer(cfg, Path(sys.argv[3])) as trainer:
        prompts = trainer.adapt([segment])
        print("READY", flush=True)
        while True:
            trainer.train(prompts)
""")


def test_ctrl_c_mid_training_stops_ray_and_every_actor(tiny_ppo_config, zork_segment, process_tracker, tmp_path):
    _, still_running = process_tracker
    (tmp_path / "cfg.json").write_text(tiny_ppo_config().model_dump_json())
    (tmp_path / "segment.json").write_text(zork_segment.to_json())
    (tmp_path / "run.py").write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.json"),
                             str(tmp_path / "segment.json"), str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    seen: set[int] = set()
    try:
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.startswith("READY"):
                break
        assert proc.poll() is None, "".join(output[-30:])
        time.sleep(3)  # inside a PPO step
        seen = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert seen, "the trainer should have started Ray processes"
    leaked = still_running(seen)
    assert not leaked, f"still running after Ctrl-C: {[p.name() for p in leaked]}"

"""`ray_address` joins an existing cluster: two `ray start` nodes on 127.0.0.1 get the PPO actors between them."""

import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from priorzero_core.ppo import PPOTrainer
from priorzero_core.ppo.strategy import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ray_two_nodes.sh"


@pytest.mark.slow
def test_actors_spread_over_both_nodes_of_a_two_node_cluster(tiny_ppo_config, zork_segment, tmp_path):
    state = tempfile.mkdtemp(prefix="pz-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TWO_NODES_DIR": state}
    started = subprocess.run([str(SCRIPT), "start", str(free_port())], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        address = started.stdout.strip().rsplit("=", 1)[1]
        cfg = tiny_ppo_config(ray_address=address, reward_workers=2)
        with PPOTrainer(cfg, tmp_path / "run") as trainer:
            assert len(set(trainer.actor_nodes())) == 2
            metrics = trainer.train(trainer.adapt([zork_segment]))
            assert math.isfinite(metrics["train/ppo_kl"])
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(state in a for a in (p.info["cmdline"] or []))]
        shutil.rmtree(state, ignore_errors=True)
    assert not left, f"the two-node cluster's processes outlived `stop`: {left}"

"""`ray_address` joins an existing cluster: two `ray start` nodes on 127.0.0.1 get the PPO actors between them."""

import math
import os
import subprocess
from pathlib import Path

import pytest

from priorzero_core.ppo import PPOTrainer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ray_two_nodes.sh"


@pytest.mark.slow
def test_actors_spread_over_both_nodes_of_a_two_node_cluster(tiny_ppo_config, zork_segment, tmp_path):
    env = {**os.environ, "RAY_TWO_NODES_DIR": str(tmp_path / "cluster")}
    started = subprocess.run([str(SCRIPT), "start", "6391"], env=env, capture_output=True, text=True, timeout=180)
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

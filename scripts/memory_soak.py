"""Resident memory over a long debug run (plain loop, no LLM): RSS after iterations 10, 20, ... 100.

    .venv/bin/python scripts/memory_soak.py [--iterations 100] [--run-dir /tmp/soak]

Flat means: what grows is the replay (reported beside RSS), not envs, encoder caches or tensors.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from priorzero_core.config import load_config
from priorzero_core.trainer import run_plain

SMALL = ["llm.enabled=false", "collect.num_envs=1", "collect.steps_per_iteration=5", "mcts.num_simulations=2",
         "eval.num_episodes=1", "eval.max_episode_steps=5", "world_model.batch_size=4", "world_model.unroll_steps=2",
         "world_model.embed_dim=32", "world_model.num_heads=2", "schedule.replay_ratio=0.5"]


def rss_mb() -> float:
    """This process and its children (valid-action workers), in MiB."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="priorzero-soak-"))
    metrics = run_dir / "logs" / "metrics.jsonl"
    done = threading.Event()

    def sample() -> None:  # run_plain appends one line per finished iteration
        reported = 0
        while not done.is_set() or reported < args.iterations:
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            if len(lines) >= reported + 10:
                reported += 10
                row = json.loads(lines[reported - 1])
                print(f"iteration {reported:4d}: RSS {rss_mb():7.1f} MiB, replay {row['replay/steps']:.0f} steps",
                      flush=True)
            elif done.is_set():
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    cfg = load_config("debug", [*SMALL, f"schedule.iterations={args.iterations}"])
    try:
        run_plain(cfg, run_dir, progress=False)
    finally:
        done.set()
        sampler.join()


if __name__ == "__main__":
    main()

"""World-model batch building vs the update it feeds, on a real run's replay (how much of WM training is Python).

Samples batches as training does (`ReplayBuffer.sample` + `sequences_to_wm_batch`, the encoder's cache warm) and
times building them against `WorldModelLearner.train_step` on them, at a config's world-model sizes.
Prints `ratio wm_batch_build_per_update <x>`: build seconds per update second.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from priorzero_core.agent import sequences_to_wm_batch
from priorzero_core.config import load_config
from priorzero_core.games import game_spec
from priorzero_core.replay import ReplayBuffer
from priorzero_core.text_encoder import TextEncoder
from priorzero_core.world_model import WorldModelLearner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("replay", type=Path, help="a run's replay/ directory")
    parser.add_argument("--config", default="zork", help="config whose world model and action space are used")
    parser.add_argument("--rom-dir", default="../shared/jericho-game-suite")
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()

    cfg = load_config(args.config, [f"game.rom_dir={args.rom_dir}"])
    wmc = cfg.world_model
    replay = ReplayBuffer(cfg.replay.capacity_steps, wmc.discount, wmc.n_step, seed=0)
    replay.load_dir(args.replay)
    encoder = TextEncoder.from_config(wmc)
    learner = WorldModelLearner(wmc, input_dim=encoder.dim)
    actions, history, device = game_spec(cfg.game).action_space_size, wmc.context_length - 1, torch.device("cpu")

    def build():
        seqs = replay.sample(wmc.batch_size, wmc.unroll_steps + 1, history, cfg.explore.demo_fraction)
        return sequences_to_wm_batch(seqs, encoder, actions, device, history=history)

    for _ in range(3):  # warm the encoder's cache, as a run's does
        learner.train_step(build())
    build_s = update_s = 0.0
    for _ in range(args.batches):
        t0 = time.perf_counter()
        batch = build()
        t1 = time.perf_counter()
        learner.train_step(batch)
        t2 = time.perf_counter()
        build_s, update_s = build_s + t1 - t0, update_s + t2 - t1
    print(f"{len(replay)} replay steps, {args.batches} batches of {wmc.batch_size}: build {build_s / args.batches * 1e3:.1f} ms, "
          f"update {update_s / args.batches * 1e3:.1f} ms")
    print(f"ratio wm_batch_build_per_update {build_s / update_s:.3f}")


if __name__ == "__main__":
    main()

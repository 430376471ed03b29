"""Go-Explore with uniformly random actions over the training code's own collector, archive and env pool: how
far exploration alone gets in a number of env steps, to compare `explore.*` settings without training.

    .venv/bin/python scripts/explore_probe.py --steps 30000 --set game.rom_dir=../shared/jericho-game-suite
    .venv/bin/python scripts/explore_probe.py --steps 30000 --set game.rom_dir=../shared/jericho-game-suite \
        explore.frontier_levels=3

Every `--report` steps it prints the archive's size, its best score and its cells per score (the top four).
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from priorzero_core.archive import Archive
from priorzero_core.collector import Collector, UniformActor
from priorzero_core.config import load_config
from priorzero_core.games.pool import EnvPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="zork")
    parser.add_argument("--steps", type=int, default=30_000, help="env steps in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=int, default=2_000)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (explore.*, game.rom_dir, ...)")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"run.seed={args.seed}", *args.set])
    pool = EnvPool(cfg.game, cfg.collect.num_envs, seed=cfg.run.seed)
    archive = Archive(cfg.explore, np.random.default_rng(args.seed + 1))
    actor = UniformActor(np.random.default_rng(args.seed + 2), pool.spec.action_space_size)
    collector = Collector(pool, actor, cfg.collect.segment_length, 0.0, np.random.default_rng(args.seed),
                          archive=archive, explore=cfg.explore)
    started, steps, next_report = time.time(), 0, args.report
    try:
        while steps < args.steps:
            _, stats = collector.collect(cfg.collect.steps_per_iteration)
            steps += stats.env_steps
            if steps >= next_report or steps >= args.steps:
                next_report += args.report
                per_score = collections.Counter(c.score for c in archive.cells.values())
                print(f"{time.time() - started:6.0f} s  steps {steps}  cells {len(archive)}  best "
                      f"{archive.best().score}  cells per score {sorted(per_score.items())[-4:]}", flush=True)
    finally:
        pool.close()


if __name__ == "__main__":
    main()

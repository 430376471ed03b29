"""Valid-action throughput on Zork 1: raw sequential Jericho vs EnvPool (shared cache + worker processes).

Random valid-action episodes from fixed seeds are played through an EnvPool, repeating episodes from the
same start as training does; the raw run then visits exactly the same states, calling Jericho's
`get_valid_actions` on each with no cache and no parallelism. The last line is
`ratio env_valid_actions <raw seconds / pool seconds>`.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import jericho

from priorzero_core.config import GameConfig
from priorzero_core.games import EnvPool
from priorzero_core.games.jericho_env import world_state_hash
from priorzero_core.games.tagger import install_tagger

SUITE = Path(__file__).resolve().parents[1] / ".." / "shared" / "jericho-game-suite"
Episode = list[str]  # the actions one env played


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="zork1", help="Jericho game name (default: zork1)")
    parser.add_argument("--rom-dir", default=os.environ.get("PRIORZERO_ROM_DIR", str(SUITE)),
                        help="folder with the ROMs (default: $PRIORZERO_ROM_DIR or ../shared/jericho-game-suite)")
    parser.add_argument("--envs", type=int, default=4, help="envs stepped together (default: 4)")
    parser.add_argument("--steps", type=int, default=30, help="steps per episode (default: 30)")
    parser.add_argument("--episodes", type=int, default=5, help="episodes per env, all from the start (default: 5)")
    parser.add_argument("--workers", type=int, default=2, help="valid-action worker processes (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the game RNGs and the random policy")
    return parser.parse_args()


def pool_episode(pool: EnvPool, args: argparse.Namespace, episode: int) -> tuple[float, list[Episode], list[str]]:
    """One episode in every env of the pool: (seconds, actions per env, hashes of the states acted in)."""
    rngs = [random.Random(f"{args.seed}-{episode}-{i}") for i in range(args.envs)]
    actions: list[Episode] = [[] for _ in range(args.envs)]
    visited: list[str] = []
    t0 = time.perf_counter()
    steps = pool.reset_all()
    for _ in range(args.steps):
        chosen = [None if ts.done else rng.choice(ts.valid_actions) for ts, rng in zip(steps, rngs)]
        for ts, played, action in zip(steps, actions, chosen):
            if action is not None:
                played.append(action)
                visited.append(ts.state_hash)
        steps = pool.step(chosen)
    return time.perf_counter() - t0, actions, visited


def raw_episode(envs: list[jericho.FrotzEnv], actions: list[Episode], seen: set[str]) -> tuple[float, float]:
    """Jericho's get_valid_actions, sequential and uncached, on the states the pool episode acted in.

    Returns (seconds for all calls, seconds for the calls on states not in `seen`, which it extends): the
    second is what a perfect cache would still pay, so it splits the ratio into cache and parallelism.
    """
    seconds = new_seconds = 0.0
    for env, played in zip(envs, actions):
        env.reset()
        for action in played:
            state = world_state_hash(env)
            t0 = time.perf_counter()
            env.get_valid_actions(use_parallel=False)
            spent = time.perf_counter() - t0
            seconds += spent
            if state not in seen:
                seen.add(state)
                new_seconds += spent
            env.step(action)
    return seconds, new_seconds


def main() -> None:
    args = parse_args()
    # The episodes end at --steps, so their last states are truncated and need no valid actions, as in training.
    cfg = GameConfig(name=args.game, rom_dir=args.rom_dir, valid_action_workers=args.workers,
                     max_episode_steps=args.steps)
    t0 = time.perf_counter()
    pool = EnvPool(cfg, args.envs, seed=args.seed)
    assert pool.valid_actions is not None, "a Jericho game is needed"
    pool.valid_actions.wait_ready()
    startup = time.perf_counter() - t0
    install_tagger()
    raw_envs = [jericho.FrotzEnv(str(pool.spec.path), seed=args.seed + i) for i in range(args.envs)]
    print(f"{args.game}: {args.envs} envs x {args.steps} steps x {args.episodes} episodes, random valid actions, "
          f"{args.workers} workers, {os.cpu_count()} cpus; worker start-up {startup:.1f} s (not timed below)")
    print(f"{'episode':>8}{'calls':>8}{'new states':>12}{'raw s':>9}{'raw new s':>11}{'pool s':>9}")
    seen: set[str] = set()
    raw_total = raw_new_total = pool_total = 0.0
    try:
        # Raw and pool alternate by episode so both see the same load on a shared machine.
        for episode in range(args.episodes):
            pool_s, actions, visited = pool_episode(pool, args, episode)
            before = len(seen)
            raw_s, raw_new_s = raw_episode(raw_envs, actions, seen)
            raw_total, raw_new_total, pool_total = raw_total + raw_s, raw_new_total + raw_new_s, pool_total + pool_s
            print(f"{episode:>8}{len(visited):>8}{len(seen) - before:>12}{raw_s:>9.1f}{raw_new_s:>11.1f}{pool_s:>9.1f}")
    finally:
        pool.close()
    print(f"{'total':>8}{'':>8}{len(seen):>12}{raw_total:>9.1f}{raw_new_total:>11.1f}{pool_total:>9.1f}")
    # raw ÷ raw-new is what the cache alone can give on these episodes; raw-new ÷ pool is what the workers
    # (and the pool's own per-step work: look, inventory, state hash) add or cost on top.
    print(f"cache alone (raw / raw new) {raw_total / raw_new_total:.2f}; "
          f"workers and pool overhead (raw new / pool) {raw_new_total / pool_total:.2f}")
    print(f"ratio env_valid_actions {raw_total / pool_total:.2f}")

if __name__ == "__main__":
    main()

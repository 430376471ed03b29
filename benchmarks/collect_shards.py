"""Collection throughput: K Ray shards of one torch thread each (`collect.shards=K`) against one process with
the machine's torch threads, the same config otherwise (world model and, unless --no-llm, the LLM prior).

For each game, each way: a Trainer is built (untimed: models, envs, Ray actors), one collect stage warms it up,
then --iterations collect stages are timed by their own clock (the stage's wall time, archive merge included).
The last line is `ratio collect_shards <value>`: env steps/s sharded ÷ in-process, the geometric mean over the
games measured (target ≥ 1.5 at K = 2). Each way also reports how many of the machine's cores were busy over its
timed collects (from /proc/stat: the whole machine, so run it on a quiet one): the in-process way's count bounds
what shards can gain on this machine, at most cores ÷ that count for the same work.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / ".." / "shared" / "jericho-game-suite"
sys.path.insert(0, str(REPO))


def cpu_jiffies() -> Optional[tuple[int, int]]:
    """(busy, total) CPU time of the whole machine since boot, in jiffies, from /proc/stat (None without it)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def steps_per_s(config: str, overrides: list[str], iterations: int, workdir: Path) -> tuple[float, float, Optional[float]]:
    """(env steps/s over the timed collects, seconds to build the trainer, cores busy over the timed collects)."""
    from priorzero_core.config import load_config
    from priorzero_core.trainer import Trainer

    started = time.perf_counter()
    trainer = Trainer(load_config(config, overrides), workdir, progress=False)
    built = time.perf_counter() - started
    try:
        trainer.collect(1)
        steps = seconds = 0.0
        before = cpu_jiffies()
        for it in range(2, iterations + 2):
            started = time.perf_counter()
            result = trainer.collect(it)
            seconds += time.perf_counter() - started
            steps += result.metrics["collect/env_steps"]
        after = cpu_jiffies()
        busy = None
        if before is not None and after is not None and after[1] > before[1]:
            busy = (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)
        return steps / seconds, built, busy
    finally:
        trainer.close()


def cores(busy: Optional[float]) -> str:
    return "cores busy unknown" if busy is None else f"{busy:.2f} of {os.cpu_count()} cores busy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["debug", "zork"],
                        help="configs to run (default: debug, the embedded game, and zork; a missing ROM is skipped)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2, help="timed collect stages per way (default: 2)")
    parser.add_argument("--steps", type=int, default=10, help="collect.steps_per_iteration (default: 10)")
    parser.add_argument("--no-llm", action="store_true", help="the world model alone (default: with the LLM prior)")
    parser.add_argument("--rom-dir", default=os.environ.get("PRIORZERO_ROM_DIR", str(SUITE)))
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    common = [f"llm.enabled={not args.no_llm}", "explore.random_steps=0", f"collect.steps_per_iteration={args.steps}",
              f"game.rom_dir={args.rom_dir}", *args.overrides]
    ratios = []
    for config in args.configs:
        from priorzero_core.config import load_config
        from priorzero_core.games import game_spec

        try:
            game = game_spec(load_config(config, common).game).name
        except Exception as err:  # no ROM here
            print(f"{config}: skipped ({str(err).splitlines()[0]})")
            continue
        with tempfile.TemporaryDirectory(prefix="priorzero-shards-") as work:
            one, built_one, busy_one = steps_per_s(config, [*common, f"run.torch_threads={threads}"], args.iterations,
                                         Path(work) / "one")
            many, built_many, busy_many = steps_per_s(config, [*common, f"collect.shards={args.shards}", "collect.shard_cpus=1",
                                                    "run.torch_threads=1"], args.iterations, Path(work) / "many")
        print(f"{game}: one process ({threads} torch threads) {one:.2f} env steps/s (built in {built_one:.1f} s, "
              f"{cores(busy_one)}), {args.shards} shards of 1 thread {many:.2f} (built in {built_many:.1f} s, "
              f"{cores(busy_many)}): {many / one:.2f}x", flush=True)
        if busy_one:
            print(f"{game}: at most {(os.cpu_count() or 1) / busy_one:.2f}x on this machine for the same work "
                  f"({os.cpu_count()} cores over the {busy_one:.2f} the one process keeps busy)", flush=True)
        ratios.append(many / one)
    if ratios:
        print(f"ratio collect_shards {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


if __name__ == "__main__":
    main()

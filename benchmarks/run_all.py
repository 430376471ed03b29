"""Run every benchmark with small-but-meaningful arguments, stream their output, and table their ratios.

Each script ends with `ratio <name> <value>` lines; this collects them and prints name / value / target / met,
also as JSON with --out. Scripts whose extra environment is missing (the peer venvs, TRL) are skipped with the
reason. The whole suite should take under 20 minutes on a 2-core CPU machine (TRL's
GRPO steps are most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
PEERS_DIR = Path(os.environ.get("PRIORZERO_BENCH_PEERS", Path.home() / ".cache" / "priorzero"))
RATIO = re.compile(r"^ratio\s+(\S+)\s+(-?[0-9.]+(?:e[-+]?\d+)?)\s*$")
# name -> (direction, bound): a ratio meets its target when it is >= (or <=) the bound
TARGETS = {
    "env_valid_actions": (">=", 5.0),
    "llm_scoring": (">=", 8.0),
    "mcts_batched": (">=", 4.0),
    "mcts_vs_lightzero": (">=", 1.2),
    "orchestration_overhead": ("<=", 1.05),
    "ppo_vs_trl": (">=", 1.0),
    "collect_shards": (">=", 1.5),
}


def peers_missing() -> Optional[str]:
    missing = [v for v in ("bench-lightzero", "bench-mctx") if not (PEERS_DIR / v / "bin" / "python").exists()]
    return f"no peer venvs {', '.join(missing)} in {PEERS_DIR}: run scripts/setup_bench_peers.sh" if missing else None


def trl_missing() -> Optional[str]:
    return None if find_spec("trl") else "TRL is not importable: pip install '.[bench]' torch==2.13.0"


@dataclass(frozen=True)
class Bench:
    script: str
    args: tuple[str, ...] = ()
    skip_reason: Callable[[], Optional[str]] = lambda: None


BENCHES = {
    "env_throughput": Bench("env_throughput.py"),
    "llm_scoring": Bench("llm_scoring.py", ("--repeats", "3")),
    "mcts": Bench("mcts.py", ("--repeats", "3")),
    "mcts_peers": Bench("mcts_peers.py", ("--repeats", "5"), peers_missing),
    "orchestration_overhead": Bench("orchestration_overhead.py", ("--iterations", "20", "--repeats", "2")),
    "ppo_throughput": Bench("ppo_throughput.py", ("--steps", "1"), trl_missing),
    "collect_shards": Bench("collect_shards.py"),
}


@dataclass
class Row:
    name: str
    value: Optional[float]
    target: str
    met: Optional[bool]
    bench: str
    note: str = ""


def parse_ratio(line: str) -> Optional[tuple[str, float]]:
    """('name', value) from a `ratio <name> <value>` line, else None."""
    match = RATIO.match(line.strip())
    return (match[1], float(match[2])) if match else None


def target_text(name: str) -> str:
    return f"{TARGETS[name][0]} {TARGETS[name][1]:g}" if name in TARGETS else ""


def meets(name: str, value: float) -> Optional[bool]:
    if name not in TARGETS:
        return None
    direction, bound = TARGETS[name]
    return value >= bound if direction == ">=" else value <= bound


def table_rows(ratios: dict[str, tuple[str, float]], notes: dict[str, str], expected: dict[str, str]) -> list[Row]:
    """One row per ratio seen (bench, value), then one per expected ratio that never came, with its bench's note."""
    rows = [Row(name, value, target_text(name), meets(name, value), bench) for name, (bench, value) in ratios.items()]
    rows += [Row(name, None, target_text(name), None, bench, notes.get(bench, "no ratio line"))
             for name, bench in expected.items() if name not in ratios]
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'ratio':<26}{'value':>9}  {'target':<9}{'met':<5}bench"]
    for r in rows:
        value = f"{r.value:.3g}" if r.value is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        lines.append(f"{r.name:<26}{value:>9}  {r.target:<9}{met:<5}{r.bench}" + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


EXPECTED = {"env_valid_actions": "env_throughput", "llm_scoring": "llm_scoring", "mcts_batched": "mcts",
            "mcts_vs_lightzero": "mcts_peers", "mcts_vs_mctx": "mcts_peers",
            "orchestration_overhead": "orchestration_overhead", "ppo_vs_trl": "ppo_throughput",
            "collect_shards": "collect_shards"}


def run(name: str, bench: Bench, timeout: float) -> tuple[list[tuple[str, float]], str]:
    """Run one script, echoing its output -> (its ratios, a note: '' when it exited 0)."""
    cmd = [sys.executable, str(HERE / bench.script), *bench.args]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    start, ratios = time.monotonic(), []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if (ratio := parse_ratio(line)) is not None:
                ratios.append(ratio)
            if time.monotonic() - start > timeout:
                proc.kill()
        code = proc.wait()
    finally:
        proc.kill()
    seconds = time.monotonic() - start
    print(f"=== {name}: exit {code} after {seconds:.0f} s", flush=True)
    note = "" if code == 0 else (f"killed after {timeout:.0f} s" if seconds > timeout else f"failed, exit {code}")
    return ratios, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", choices=sorted(BENCHES), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHES)}")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one benchmark may run (default: 900)")
    args = parser.parse_args()

    chosen = args.only or list(BENCHES)
    ratios: dict[str, tuple[str, float]] = {}
    notes: dict[str, str] = {}
    for name in chosen:
        bench = BENCHES[name]
        if reason := bench.skip_reason():
            print(f"\n=== {name}: skipped: {reason}", flush=True)
            notes[name] = f"skipped: {reason}"
            continue
        found, note = run(name, bench, args.timeout)
        ratios.update({ratio: (name, value) for ratio, value in found})
        if note:
            notes[name] = note
    rows = table_rows(ratios, notes, {r: b for r, b in EXPECTED.items() if b in chosen})
    print("\n" + format_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        print(f"wrote {args.out}")
    sys.exit(1 if any(note and not note.startswith("skipped") for note in notes.values()) else 0)


if __name__ == "__main__":
    main()

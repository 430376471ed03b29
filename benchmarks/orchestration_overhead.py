"""Orchestration overhead: one short debug training as a plain loop (`run_plain`) and as the Prefect flow with
MLflow tracking, each in a fresh process (no warm caches carried from one to the other), timed end to end.

Untimed: starting a local Prefect server, creating the MLflow store (every later run finds both ready) and one
warm-up process (disk caches). The last line is `ratio orchestration_overhead <flow_s / plain_s>` from the
fastest of each over --repeats (target ≤ 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/servers.py, a dev tool
from servers import prefect_server  # noqa: E402


def train(kind: str, args: argparse.Namespace, name: str) -> None:
    """One training in this process: `plain` (run_plain) or `flow` (the priorzero flow, tracked)."""
    overrides = [*args.overrides, f"run.run_dir={args.workdir / 'runs'}",
                 f"tracking.uri=sqlite:///{args.workdir / 'mlruns' / 'mlflow.db'}"]
    if kind == "plain":
        from priorzero_core.config import load_config
        from priorzero_core.trainer import run_plain

        cfg = load_config(args.config, [*overrides, f"schedule.iterations={args.iterations}"])
        run_plain(cfg, args.workdir / "runs" / name, progress=False)
    else:
        from priorzero.cli import connect_prefect

        connect_prefect(require_server=True)
        from priorzero.flows.priorzero_flow import priorzero

        priorzero(config=args.config, overrides=overrides, iterations=args.iterations, run_name=name)


def timed(kind: str, args: argparse.Namespace, name: str, iterations: int | None = None) -> float:
    cmd = [sys.executable, __file__, "--config", args.config, "--iterations", str(iterations or args.iterations),
           "--workdir", str(args.workdir), "--child", kind, "--name", name, "--set", *args.overrides]
    started = time.perf_counter()
    with open(args.workdir / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="debug", help="config name or YAML path (default: debug)")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per training (default: 10)")
    # One torch thread in both: with two, tiny ops on a busy 2-core box run up to 10x slower on the main thread
    # (run_plain) than on a task thread (the flow), which would swamp what this measures.
    parser.add_argument("--set", nargs="*", default=["llm.enabled=false", "run.torch_threads=1"], dest="overrides",
                        metavar="KEY=VALUE", help="config overrides (default: llm.enabled=false run.torch_threads=1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate plain and flow runs N times and compare the fastest of each (default: 3)")
    parser.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL"),
                        help="a running Prefect API (default: $PREFECT_API_URL, else a temporary local server)")
    parser.add_argument("--workdir", type=Path, help="runs, MLflow store and logs (default: a temp dir)")
    parser.add_argument("--child", choices=["plain", "flow"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="priorzero-overhead-"))).resolve()
    if args.child:
        return train(args.child, args, args.name)

    with ExitStack() as stack:
        started = time.perf_counter()
        os.environ["PREFECT_API_URL"] = args.prefect_api or stack.enter_context(
            prefect_server(args.workdir / "prefect-home"))
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{args.workdir / 'mlruns' / 'mlflow.db'}").search_experiments()
        timed("plain", args, "warmup", iterations=1)
        print(f"untimed set-up (server, store, warm-up) {time.perf_counter() - started:.1f} s", flush=True)
        plain, flow = [], []
        for r in range(args.repeats):
            plain.append(timed("plain", args, f"plain-{r}"))
            flow.append(timed("flow", args, f"flow-{r}"))
            print(f"repeat {r}: plain {plain[-1]:.2f} s, flow {flow[-1]:.2f} s", flush=True)
    print(f"work dir {args.workdir} (logs: plain-N.log, flow-N.log)")
    print(f"median plain {statistics.median(plain):.2f} s, flow {statistics.median(flow):.2f} s")
    # The fastest of each: on a shared machine, other work only ever adds time.
    print(f"ratio orchestration_overhead {min(flow) / min(plain):.3f}")


if __name__ == "__main__":
    main()

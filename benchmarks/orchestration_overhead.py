"""Orchestration overhead: one short debug training as a plain loop (`run_plain`) and as the Prefect flow with
MLflow tracking, in one process, against one local Prefect server.

Untimed first: starting the Prefect server, one warm-up iteration (imports, model files) and creating the MLflow
store, which every later run finds ready. The last line is `ratio orchestration_overhead <flow_s / plain_s>`
(target ≤ 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from priorzero.flows.servers import prefect_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="debug", help="config name or YAML path (default: debug)")
    parser.add_argument("--iterations", type=int, default=3, help="iterations per training (default: 3)")
    parser.add_argument("--set", nargs="*", default=["llm.enabled=false"], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides (default: llm.enabled=false)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate plain and flow runs N times; medians compared")
    parser.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL"),
                        help="a running Prefect API (default: $PREFECT_API_URL, else a temporary local server)")
    parser.add_argument("--workdir", type=Path, help="where runs and the MLflow store go (default: a temp dir)")
    args = parser.parse_args()

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="priorzero-overhead-"))).resolve()
    store = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    overrides = [*args.overrides, f"run.run_dir={work / 'runs'}", f"tracking.uri={store}"]
    with ExitStack() as stack:
        started = time.perf_counter()
        os.environ["PREFECT_API_URL"] = args.prefect_api or stack.enter_context(prefect_server(work / "prefect-home"))
        print(f"prefect API {os.environ['PREFECT_API_URL']} ready in {time.perf_counter() - started:.1f} s (untimed)")
        from priorzero.flows.cli import connect_prefect

        connect_prefect(require_server=True)
        from mlflow import MlflowClient

        from priorzero.flows.priorzero_flow import priorzero
        from priorzero_core.config import load_config
        from priorzero_core.trainer import run_plain

        cfg = load_config(args.config, [*overrides, f"schedule.iterations={args.iterations}"])
        run_plain(cfg, work / "runs" / "warmup", iterations=1, progress=False)
        MlflowClient(store).search_experiments()  # creates the shared store
        plain, flow = [], []
        for r in range(args.repeats):
            started = time.perf_counter()
            run_plain(cfg, work / "runs" / f"plain-{r}", progress=False)
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            priorzero(config=args.config, overrides=overrides, iterations=args.iterations, run_name=f"flow-{r}")
            flow.append(time.perf_counter() - started)
            print(f"repeat {r}: plain {plain[-1]:.2f} s, flow {flow[-1]:.2f} s", flush=True)
    print(f"work dir {work}")
    print(f"ratio orchestration_overhead {statistics.median(flow) / statistics.median(plain):.3f}")


if __name__ == "__main__":
    main()

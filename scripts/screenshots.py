"""Screenshots of the Prefect UI and the MLflow UI showing real runs, taken with headless Chromium into docs/img/.

Starts a temporary Prefect server, trains two short debug runs through the flow (the first with an injected
`collect` failure, so Failed and Skipped stages show), starts `mlflow ui` on their store, and photographs the
flow-run pages, the latest evaluation artifact (its table and the first episode's moves), the experiment's runs
and their metric charts overlaid, one MLflow run with its logged model and its system metrics, and the model
registry's `priorzero-embedded` with the `@best` alias. Needs Debian's `chromium` package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from servers import mlflow_ui, prefect_server

REPO = Path(__file__).resolve().parent.parent
MLFLOW_HOST = "priorzero-mlflow"
TRAINING = ["llm.enabled=false", "collect.steps_per_iteration=5", "collect.num_envs=1", "mcts.num_simulations=2",
            "eval.eval_freq=2", "eval.max_episode_steps=10", "run.stage_retry_delay_s=0"]


def screenshot(url: str, path: Path, size: str = "1600,1000", budget_ms: int = 15000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        # Both UIs render client-side: without a virtual-time budget the picture is blank. MLflow is reached as
        # MLFLOW_HOST, since on 127.0.0.1 it opens its assistant panel over a third of the page.
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                        f"--host-resolver-rules=MAP {MLFLOW_HOST} 127.0.0.1", f"--window-size={size}",
                        f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=300)
    print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}  ←  {url}")


def latest_artifact(api: str, flow_run_id, key: str) -> str:
    """The id of the newest artifact `key` of a flow run, from the Prefect API."""
    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}, "key": {"any_": [key]}}, "sort": "CREATED_DESC",
            "limit": 1}
    request = urllib.request.Request(f"{api}/artifacts/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        (artifact,) = json.load(response)
    return artifact["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="where the PNGs go (default: docs/img)")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per run (default: 10)")
    parser.add_argument("--workdir", type=Path, help="runs, stores and server logs (default: a temp dir)")
    args = parser.parse_args()

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="priorzero-screenshots-"))).resolve()
    store = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    args.out.mkdir(parents=True, exist_ok=True)
    with prefect_server(work / "prefect-home") as api:
        os.environ["PREFECT_API_URL"] = api
        from priorzero.cli import connect_prefect

        connect_prefect(require_server=True)
        from mlflow import MlflowClient

        from priorzero.flows.priorzero_flow import priorzero

        flow_runs = []
        for seed, faults in ((0, "collect@2"), (1, "")):
            os.environ["PRIORZERO_FAULTS"] = faults
            overrides = [*TRAINING, f"run.seed={seed}", f"run.run_dir={work / 'runs'}", f"tracking.uri={store}"]
            state = priorzero(config="debug", overrides=overrides, iterations=args.iterations,
                              run_name=f"debug-seed{seed}", return_state=True)
            flow_runs.append(state.state_details.flow_run_id)
        os.environ.pop("PRIORZERO_FAULTS")
        ui = api.removesuffix("/api")
        screenshot(f"{ui}/runs/flow-run/{flow_runs[0]}", args.out / "prefect-flow-run-skipped.png")
        screenshot(f"{ui}/runs/flow-run/{flow_runs[1]}", args.out / "prefect-flow-run.png")
        # The latest evaluation artifact's own page (its table, the first episode's moves, the flow run it is of):
        # the flow-run page opens on its Logs tab whatever the URL asks.
        screenshot(f"{ui}/artifacts/artifact/{latest_artifact(api, flow_runs[1], 'debug-seed1-evaluation')}",
                   args.out / "prefect-artifacts.png", size="1600,900")
        screenshot(f"{ui}/runs", args.out / "prefect-runs.png")

        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("priorzero-embedded").experiment_id
        (run,) = client.search_runs([experiment], filter_string="attributes.run_name = 'debug-seed1'")
        with mlflow_ui(store, work / "mlflow-ui.log", host_alias=MLFLOW_HOST) as mlflow_url:
            base = f"{mlflow_url.replace('127.0.0.1', MLFLOW_HOST)}/#"
            runs = f"{base}/experiments/{experiment}/runs"
            ml = "workflowType=machine_learning"  # the UI's model-training side, not its GenAI one
            screenshot(f"{runs}?{ml}", args.out / "mlflow-runs.png")
            screenshot(f"{runs}/{run.info.run_id}?{ml}", args.out / "mlflow-run.png", size="1600,1400")
            screenshot(f"{runs}/{run.info.run_id}/system-metrics?{ml}", args.out / "mlflow-system-metrics.png",
                       size="1600,1400", budget_ms=180000)  # its charts load after the page
            screenshot(f"{base}/models/priorzero-embedded?{ml}", args.out / "mlflow-registered-model.png")
            # Metric charts draw last: they need a longer budget.
            screenshot(f"{runs}?compareRunsMode=CHART&{ml}", args.out / "mlflow-compare.png", size="1600,2400",
                       budget_ms=90000)


if __name__ == "__main__":
    main()

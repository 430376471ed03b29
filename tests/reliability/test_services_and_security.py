"""Dead services and security: MLflow dying mid-run, servers on 127.0.0.1 only, no unpickling, no secrets in
logs or MLflow params."""

import re
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import psutil
from mlflow import MlflowClient

from priorzero.flows.priorzero_flow import priorzero
from servers import mlflow_ui
from priorzero.tasks.tracking import Tracker
from priorzero_core import checkpoint as ckpt

from .conftest import tracking_uri

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-sentinel-7f2a"


def listeners(port: int) -> list[str]:
    """Addresses of every socket listening on `port`, and of every other listener of the process that owns it."""
    conns = psutil.net_connections(kind="inet")
    pids = {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert pids, f"nothing listens on port {port}"
    tree = set(pids)
    for pid in pids:
        tree |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.pid in tree]


def test_the_prefect_server_listens_on_loopback_only(prefect_server):
    addresses = listeners(urlparse(prefect_server).port)
    assert set(addresses) == {"127.0.0.1"}, addresses


def test_project_code_never_unpickles_or_binds_beyond_loopback():
    dirs = [REPO / d for d in ("priorzero_core", "src", "scripts")]
    assert all(d.is_dir() for d in dirs)  # a moved directory would otherwise be scanned as empty
    sources = {p: p.read_text() for d in dirs for p in d.rglob("*.py")}
    for path, text in sources.items():
        for line in (line for line in text.splitlines() if "torch.load(" in line):
            assert "weights_only=True" in line, f"{path}: {line.strip()}"
        assert not re.search(r"\bpickle\.loads?\(|weights_only=False|trust_remote_code=True", text), path
        assert "0.0.0.0" not in text, path
    ray = sources[REPO / "priorzero_core" / "ray_cluster.py"]
    assert '_node_ip_address="127.0.0.1", include_dashboard=False' in ray  # the local Ray cluster


def test_mlflow_server_dying_mid_run_leaves_training_and_saved_data_intact(prefect_api, debug_overrides, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    store = tracking_uri(debug_overrides)
    monkeypatch.chdir(tmp_path)  # `mlflow ui` keeps artifacts in ./mlartifacts
    with ExitStack() as server:
        url = server.enter_context(mlflow_ui(store, tmp_path / "mlflow.log"))
        assert set(listeners(urlparse(url).port)) == {"127.0.0.1"}
        log_artifacts = Tracker._log_artifacts

        def then_stop_the_server(self, iteration, *args):
            log_artifacts(self, iteration, *args)
            if iteration == 1:
                server.close()  # terminates `mlflow ui`; the store behind it keeps what it has

        monkeypatch.setattr(Tracker, "_log_artifacts", then_stop_the_server)
        overrides = [o for o in debug_overrides if not o.startswith("tracking.uri=")] + [f"tracking.uri={url}"]
        state = priorzero(config="debug", iterations=3, run_name="mlflow-dies", return_state=True, overrides=overrides)

    assert state.is_completed(), state.message
    run_dir = tmp_path / "runs" / "mlflow-dies"
    assert [ckpt.verify(p)["meta"]["iteration"] for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == [1, 2, 3]
    log = (run_dir / "logs" / "flow.log").read_text()
    assert log.count("training continues without tracking") == 1
    client = MlflowClient(store)  # read the store directly: iteration 1 got there, then nothing was retried or lost
    (run,) = client.search_runs([client.get_experiment_by_name("priorzero-embedded").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "collect/env_steps")] == [1]
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    assert SECRET not in logged and SECRET not in log
    assert SECRET not in (run_dir / "logs" / "train.log").read_text() + (run_dir / "config.yaml").read_text()

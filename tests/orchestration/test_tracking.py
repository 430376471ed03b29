"""MLflow tracking against real sqlite stores in tmp_path (no Prefect needed)."""

import logging
from pathlib import Path

from mlflow import MlflowClient

from servers import free_port
from priorzero.tasks.tracking import Tracker, artifact_root, tracking_uri
from priorzero_core.config import config_from_dict

LOG = logging.getLogger("test.tracking")


def make_cfg(tmp_path: Path, **tracking):
    return config_from_dict({"tracking": {"uri": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", **tracking}})


def test_default_store_is_one_sqlite_file_under_cwd_mlruns_with_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(config_from_dict({}))

    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert artifact_root(uri) == (tmp_path / "mlruns" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(config_from_dict({})) == "http://127.0.0.1:5000"


def test_iteration_metrics_land_in_one_batch_with_their_artifacts(tmp_path):
    cfg = make_cfg(tmp_path)
    transcript = tmp_path / "eval-000001.txt"
    transcript.write_text("> look\n")
    tracker = Tracker(cfg, tmp_path / "run", LOG)
    (tmp_path / "run").mkdir()
    tracker.start(run_name="run", tags={"prefect.flow_run_id": "abc"})
    tracker.log_iteration(1, {"evals/reward_mean": 1.0, "train/wm_total_loss": 2.0}, {"transcript": transcript})
    tracker.log_iteration(2, {"train/wm_total_loss": 1.5}, {"checkpoint": tmp_path / "ckpt"})
    tracker.commit()
    tracker.end("FINISHED")

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == "abc"
    assert run.data.params["mcts.num_simulations"] == "25"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/wm_total_loss")] == [
        (1, 2.0), (2, 1.5)]
    paths = {a.path for folder in ("", "transcripts") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"config.yaml", "checkpoint.json", "transcripts/eval-000001.txt"} <= paths
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())


def test_resume_continues_the_same_mlflow_run_with_later_steps(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = Tracker(make_cfg(tmp_path), run_dir, LOG)
    first.start(run_name="run", tags={})
    first.log_iteration(1, {"collect/total_env_steps": 5.0}, {})
    first.commit()
    first.end("KILLED")

    resumed = Tracker(config_from_dict({"tracking": {"uri": first.uri}, "schedule": {"iterations": 7}}), run_dir, LOG)
    resumed.start(run_name="run", tags={})
    resumed.log_iteration(2, {"collect/total_env_steps": 10.0}, {})
    resumed.commit()
    resumed.end("FINISHED")

    assert resumed.run_id == first.run_id
    client = MlflowClient(first.uri)
    run = client.get_run(first.run_id)  # params are immutable: the change the resume made is a tag
    assert run.data.params["schedule.iterations"] == "1000"
    assert run.data.tags["priorzero.config.schedule.iterations"] == "7"
    assert "priorzero.config.mcts.num_simulations" not in run.data.tags  # unchanged
    assert [m.step for m in client.get_metric_history(first.run_id, "collect/total_env_steps")] == [1, 2]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_iterations_reach_mlflow_only_once_checkpointed_and_a_resume_logs_the_checkpointed_ones_it_lacks(tmp_path):
    """With run.checkpoint_freq > 1 the iterations after the last checkpoint run again on resume: they must not
    be logged before (duplicate steps). A checkpointed iteration whose process died before it was logged is
    logged on resume, from logs/metrics.jsonl."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = Tracker(make_cfg(tmp_path), run_dir, LOG)
    first.start(run_name="run", tags={})
    for n in (1, 2, 3):
        first.log_iteration(n, {"timing/iteration_s": 1.0, "collect/env_steps": float(n)}, {})
        if n == 2:  # checkpoint_freq 2
            first.commit()
    first.end("KILLED")  # iteration 3: no checkpoint holds it
    client = MlflowClient(first.uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "collect/env_steps")] == [1, 2]

    resumed = Tracker(make_cfg(tmp_path), run_dir, LOG)
    resumed.start(run_name="run", tags={})
    rows = [{"iteration": n, "timing/iteration_s": 1.0, "collect/env_steps": float(n)} for n in (1, 2, 3, 4)]
    resumed.catch_up(rows)  # 3 and 4: checkpointed, never logged
    resumed.end("FINISHED")

    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "collect/env_steps")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


def test_unreachable_tracking_server_warns_once_and_training_goes_on(tmp_path, caplog):
    cfg = config_from_dict({"tracking": {"uri": f"http://127.0.0.1:{free_port()}"}})
    tracker = Tracker(cfg, tmp_path, LOG)

    with caplog.at_level(logging.WARNING, logger=LOG.name):
        tracker.start(run_name="run", tags={})
        for n in (1, 2, 3):
            tracker.log_iteration(n, {"train/wm_total_loss": 1.0}, {})
            tracker.commit()
        tracker.end("FINISHED")

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "training continues without tracking" in warnings[0]
    assert not tracker.active


def test_disabled_tracking_touches_no_store(tmp_path):
    cfg = make_cfg(tmp_path, enabled=False)
    tracker = Tracker(cfg, tmp_path, LOG)
    tracker.start(run_name="run", tags={})
    tracker.log_iteration(1, {"train/wm_total_loss": 1.0}, {})

    assert not tracker.active
    assert not (tmp_path / "store").exists()


def test_an_agent_that_cannot_be_registered_is_a_warning_and_metrics_go_on(tmp_path, caplog):
    cfg = make_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    broken = tmp_path / "run" / "agents" / "iter-000001"
    broken.mkdir(parents=True)  # no agent.json: not an exported agent
    tracker = Tracker(cfg, tmp_path / "run", LOG)
    tracker.start(run_name="run", tags={})
    with caplog.at_level("WARNING", logger=LOG.name):
        tracker.log_agent(1, broken)
        tracker.log_iteration(2, {"train/wm_total_loss": 1.0}, {})
        tracker.commit()
        tracker.end("FINISHED")
    assert "the agent of iteration 1 was not registered" in caplog.text
    assert not broken.exists()
    client = MlflowClient(cfg.tracking.uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/wm_total_loss")] == [2]

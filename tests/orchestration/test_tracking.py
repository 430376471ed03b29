"""MLflow tracking against real sqlite stores in tmp_path (no Prefect needed)."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from interrupts import ctrl_c_as_in_a_terminal
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



def test_each_registered_version_keeps_the_agent_it_was_registered_with_and_eval_finds_it(tmp_path):
    """Two best agents of one run: each version of the registered model downloads (and `priorzero eval` plays)
    its own, not the one logged last; @best stays on the highest evaluation across runs."""
    import mlflow

    from priorzero.cli import registered_agent_dir

    cfg = make_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    tracker = Tracker(cfg, tmp_path / "run", LOG)
    tracker.start(run_name="run", tags={})
    for iteration in (6, 21):
        agent = tmp_path / "run" / "agents" / f"iter-{iteration:06d}-1"
        agent.mkdir(parents=True)
        (agent / "agent.json").write_text(json.dumps({"iteration": iteration, "checkpoint": f"iter-{iteration - 1:06d}",
                                                      "evaluation": {"evals/reward_mean": float(iteration)},
                                                      "sha256": {}}))
        tracker.log_agent(iteration, agent)
    tracker.end("FINISHED")

    client = MlflowClient(cfg.tracking.uri)
    name = tracker.registered_model_name
    assert str(client.get_model_version_by_alias(name, "best").version) == "2"
    mlflow.set_tracking_uri(cfg.tracking.uri)
    for version, iteration in (("1", 6), ("2", 21)):
        uri = f"models:/{name}/{version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / version)))
        played = json.loads((registered_agent_dir(local, uri) / "agent.json").read_text())
        assert played["iteration"] == iteration and played["checkpoint"] == f"iter-{iteration - 1:06d}"
        assert client.get_model_version(name, version).tags["iteration"] == str(iteration)

    # A later run whose best agent evaluates lower gets a version, not @best.
    (tmp_path / "run2").mkdir()
    later = Tracker(cfg, tmp_path / "run2", LOG)
    later.start(run_name="run2", tags={})
    agent = tmp_path / "run2" / "agents" / "iter-000006-1"
    agent.mkdir(parents=True)
    (agent / "agent.json").write_text(json.dumps({"iteration": 6, "evaluation": {"evals/reward_mean": 10.0},
                                                  "sha256": {}}))
    later.log_agent(6, agent)
    later.end("FINISHED")
    assert len(client.search_model_versions(f"name='{name}'")) == 3
    assert str(client.get_model_version_by_alias(name, "best").version) == "2"


TRAINING = """
import logging, sys, time
from pathlib import Path
from priorzero.tasks.tracking import Tracker
from priorzero_core.config import config_from_dict

tracker = Tracker(config_from_dict({"tracking": {"uri": sys.argv[1]}}), Path(sys.argv[2]), logging.getLogger("t"))
try:
    tracker.start(run_name="run", tags={})
    assert tracker.wait_started(120)
    tracker.log_iteration(1, {"train/wm_total_loss": 1.0}, {})
    tracker.commit()
    print("mlflow imported:", any(m.split(".")[0] == "mlflow" for m in sys.modules), flush=True)
    print("mlflow process:", tracker._proc.pid, flush=True)
    time.sleep(120)
except KeyboardInterrupt:
    tracker.end("KILLED")
    print("ended", flush=True)
"""


def start_training(tmp_path: Path) -> tuple[subprocess.Popen, str, int, bool]:
    """A process that tracks one iteration and then waits, in a session of its own as a terminal's foreground job
    is; (the process, the store, the MLflow process's pid, whether MLflow was imported in the process)."""
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "run").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", TRAINING, store, str(tmp_path / "run")], stdout=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=ctrl_c_as_in_a_terminal)
    imported = proc.stdout.readline().split()[-1] == "True"
    return proc, store, int(proc.stdout.readline().split()[-1]), imported


def test_mlflow_runs_outside_the_training_process_and_ctrl_c_reaches_only_the_training_process(tmp_path,
                                                                                          process_tracker):
    _, still_running = process_tracker
    proc, store, mlflow_pid, imported = start_training(tmp_path)
    try:
        assert not imported  # its import and store would take the GIL from the trainer
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
        out, _ = proc.communicate(timeout=90)
        assert out.strip() == "ended" and proc.returncode == 0
    finally:
        proc.kill()
    assert not still_running({mlflow_pid}, 30)  # it ends with the tracker
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "KILLED"  # the MLflow process was still there to record it
    assert [m.step for m in client.get_metric_history(run_id, "train/wm_total_loss")] == [1]


def test_the_mlflow_process_ends_with_a_training_process_killed_with_sigkill(tmp_path, process_tracker):
    _, still_running = process_tracker
    proc, _, mlflow_pid, _ = start_training(tmp_path)
    proc.kill()
    proc.wait(30)
    try:
        assert not still_running({mlflow_pid}, 30), "the MLflow process outlived the training process"
    finally:
        for leftover in still_running({mlflow_pid}, 0):
            leftover.kill()

"""A stage that raises or hangs past `run.stage_timeout_s` is retried per config, then the stages that need
it are skipped for that iteration and the run completes; Prefect and MLflow both say what was skipped and why."""

import pytest

from priorzero.flows.priorzero_flow import priorzero
from priorzero_core import checkpoint as ckpt

from orchestration.test_priorzero_flow import mlflow_run, task_runs


@pytest.mark.parametrize("fault, error", [
    ("train_world_model@2", "RuntimeError: injected fault train_world_model@2"),
    pytest.param("hang:train_world_model@2", "TimeoutError", marks=pytest.mark.slow),  # waits out two timeouts
])
def test_a_failing_or_hanging_stage_is_retried_then_skips_its_dependents_and_says_why(
        prefect_api, debug_overrides, monkeypatch, tmp_path, fault, error):
    monkeypatch.setenv("PRIORZERO_FAULTS", fault)

    state = priorzero(config="debug", iterations=3, run_name="faulty", return_state=True, overrides=[
        *debug_overrides, "run.stage_retries=1", "run.stage_timeout_s=8"])

    assert state.is_completed(), state.message
    assert state.result()["failed_iterations"] == [2]
    runs = task_runs(state.state_details.flow_run_id)
    failed = runs["train_world_model-2"]
    assert failed.state.is_failed() and failed.run_count == 2  # the first try and one retry
    assert runs["checkpoint-2"].state.name == "Skipped" and runs["checkpoint-2"].state.type.value == "COMPLETED"
    assert runs["checkpoint-2"].state.message == "train_world_model-2 failed"
    assert all(runs[f"{stage}-3"].state.is_completed() for stage in ("collect", "train_world_model", "checkpoint"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "runs" / "faulty" / "checkpoints")] == [
        "iter-000001", "iter-000003"]

    client, run = mlflow_run(debug_overrides)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "iteration/failed")] == [
        (1, 0.0), (2, 1.0), (3, 0.0)]
    import pandas as pd  # the failures table: one row per iteration that failed
    (table,) = [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "failures.json"]
    failures = pd.read_json(client.download_artifacts(run.info.run_id, table), orient="split")
    assert failures["iteration"].tolist() == [2] and failures["skipped"].tolist() == ["checkpoint-2"]
    assert failures["failure"][0].startswith("train_world_model-2: ") and error in failures["failure"][0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/wm_total_loss")] == [1, 3]
    assert run.info.status == "FINISHED"

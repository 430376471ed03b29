"""The priorzero flow against a real Prefect server and a real MLflow sqlite store, with the real Trainer."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort
from prefect.states import Completed, Failed

from priorzero.flows.priorzero_flow import (TRAINING_PID_FILE, Iteration, Progress, final_checkpoint, priorzero,
                                            resolve_run, take_over)
from priorzero.tasks import Tracker, close_trainer, open_trainer
from priorzero_core import checkpoint as ckpt
from priorzero_core.trainer import read_metrics, run_plain
from priorzero_core.errors import ConfigError
from measures import wall_clock


def task_runs(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    return {run.name: run for run in runs}


def mlflow_run(overrides):
    uri = next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri="))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("priorzero-embedded").experiment_id])
    return client, run


def test_a_failed_collect_skips_training_and_checkpoint_and_skips_pass_their_reason_on():
    it = Iteration(2, states={"evaluate": Completed(), "collect": Failed(message="boom")})

    assert it.skip_reason("train_world_model") == "collect-2 failed"
    assert it.skip_reason("checkpoint") == "collect-2 failed"
    it.blocked["adapt"] = "collect-2 failed"  # run_iteration skipped it: Completed(name="Skipped")
    it.record("adapt", Completed(name="Skipped", message="collect-2 failed"))
    assert it.skip_reason("ppo_train") == "collect-2 failed"  # a Completed-type Skipped state still blocks
    assert it.failure_row(it.failure()) == {"iteration": 2, "failure": "collect-2: FailedRun: boom",
                                            "skipped": "adapt-2"}


def test_an_adapt_stage_that_skips_itself_skips_ppo_train_instead_of_passing_it_no_prompts():
    from priorzero_core.trainer import StageResult

    it = Iteration(5)
    it.record("collect", Completed(data=StageResult(metrics={})))
    it.record("adapt", Completed(name="Skipped", message="adapt-5: no states", data=StageResult(skipped="no states")))
    assert it.skip_reason("ppo_train") == "adapt-5: no states"
    it.record("adapt", Completed(data=StageResult(metrics={}, artifacts={"prompts": "prompts-5.jsonl"})))
    assert it.skip_reason("ppo_train") is None


def test_stages_that_did_not_run_this_iteration_block_nothing():
    it = Iteration(3, states={"collect": Completed(), "train_world_model": Completed()})

    assert it.skip_reason("checkpoint") is None  # no LLM stage was due
    assert it.failure() is None


def test_resume_needs_a_run_name_and_a_new_run_never_reuses_a_run_dir(tmp_path):
    with pytest.raises(ConfigError, match="resume needs run_name"):
        resolve_run("debug", [f"run.run_dir={tmp_path}"], None, True, None)
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already has checkpoints"):
        resolve_run("debug", [f"run.run_dir={tmp_path}"], None, False, "old")


def test_a_run_dir_another_live_process_trains_is_refused_and_a_dead_ones_is_taken_over(tmp_path):
    import subprocess

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        (run_dir / TRAINING_PID_FILE).write_text(str(other.pid))
        with pytest.raises(ConfigError, match=f"being trained by process {other.pid}"):
            take_over(run_dir, "1b4e28ba-2fa1-11d2-883f-0016d3cca427", logging.getLogger("test"))
    finally:
        other.kill()
        other.wait()
    take_over(run_dir, "1b4e28ba-2fa1-11d2-883f-0016d3cca427", logging.getLogger("test"))  # its holder is gone
    assert (run_dir / TRAINING_PID_FILE).read_text() == str(os.getpid())


def test_a_resumed_run_counts_as_best_only_evaluations_whose_agent_could_be_logged():
    """The bar a resumed run's next best agent must pass: the untrained first evaluation and an evaluation in an
    iteration that failed before its checkpoint logged no agent, so they do not count."""
    rows = [{"iteration": 1, "evals/reward_mean": 5.0, "timing/checkpoint_s": 0.1},  # untrained weights
            {"iteration": 2, "timing/checkpoint_s": 0.1},
            {"iteration": 3, "evals/reward_mean": 3.0, "evals/weights_iteration": 2.0, "timing/checkpoint_s": 0.1},
            {"iteration": 4, "evals/reward_mean": 9.0, "evals/weights_iteration": 3.0, "iteration/failed": 1.0}]
    progress = Progress()
    progress.resumed(rows)
    assert progress.best == 3.0 and progress.evaluation["evals/reward_mean"] == 9.0  # the latest, not logged
    progress.saw({"evals/reward_mean": 4.0, "evals/weights_iteration": 4.0})
    assert progress.new_best() and progress.best == 4.0


def test_three_iterations_complete_with_metrics_per_iteration_in_mlflow(prefect_api, debug_overrides, tmp_path):
    overrides = [*debug_overrides, "tracking.system_metrics_interval_s=1", "tracking.log_models=true"]
    state = priorzero(config="debug", overrides=overrides, iterations=3, return_state=True)

    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    for n in (1, 2, 3):
        assert runs[f"collect-{n}"].state.is_completed()
        assert runs[f"train_world_model-{n}"].state.is_completed()
    assert {"evaluate-1", "evaluate-3", "checkpoint-3"} <= set(runs)

    client, run = mlflow_run(debug_overrides)
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.params["mcts.num_simulations"] == "2"
    for key in ("train/wm_total_loss", "collect/total_env_steps", "timing/collect_s", "timing/iteration_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "evals/reward_mean")] == [1, 3]
    # which checkpoint's weights each evaluation played: none at iteration 1 (untrained), checkpoint 2's at 3
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "evals/weights_iteration")] \
        == [(3, 2.0)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint.json", "transcripts"} <= artifacts
    assert run.info.status == "FINISHED"
    # what a comparison needs: who ran which code; the system's load; no link to a server that will not exist
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert run.data.tags["mlflow.source.git.commit"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    assert "prefect.flow_run_url" in run.data.tags  # a real server's UI (the session's server)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "iteration/failed")] == [0.0, 0.0, 0.0]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)

    # The flow run's Prefect artifacts: progress, one evaluation table per evaluation, where its MLflow run is.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_type = {}
    for art in found:
        by_type.setdefault(art.type, []).append(art)
    (prog,) = by_type["progress"]
    assert prog.data == 100.0 and prog.key.endswith("-progress") and "3/3 iterations" in prog.description
    tables = by_type["table"]
    assert len(tables) == 2 and all(t.key.endswith("-evaluation") for t in tables)  # iterations 1 and 3
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert rows[0]["mode"] == "wm" and {"reward_mean", "reward_max"} <= set(rows[0])
    assert any("First episode: `> " in t.description for t in tables)
    (where,) = by_type["markdown"]
    assert run.info.run_id in where.data and "mlflow ui --backend-store-uri" in where.data

    # The agent each evaluation that was the best so far played is a version of priorzero-embedded in the Model
    # Registry, the best at @best; it loads and acts in a fresh process, and `priorzero eval` plays it. An iteration
    # evaluates the weights of the checkpoint before it: those are the weights logged (iteration 1's, untrained and
    # in no checkpoint, are not).
    best = client.get_model_version_by_alias("priorzero-embedded", "best")
    versions = client.search_model_versions("name='priorzero-embedded'")
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "evals/reward_mean")}
    logged = sorted(int(v.tags["iteration"]) for v in versions)
    assert logged[0] == 3 and set(logged) <= set(evals)  # the first evaluation of checkpointed weights, then improvements
    assert all(evals[b] > evals[a] for a, b in zip(logged, logged[1:]))
    assert int(best.tags["iteration"]) == logged[-1] and best.run_id == run.info.run_id
    assert float(best.tags["evals/reward_mean"]) == max(v for k, v in evals.items() if k > 1)
    assert best.tags["checkpoint"] == f"iter-{logged[-1] - 1:06d}"
    (run_dir,) = Path(debug_overrides[0].split("=", 1)[1]).iterdir()
    assert not list((run_dir / "agents").iterdir())  # the exported copies were logged, then removed
    (copy,) = client.list_artifacts(run.info.run_id, f"agents/iter-{logged[-1]:06d}/artifacts")  # the export
    agent_json = Path(client.download_artifacts(run.info.run_id, f"{copy.path}/agent.json", str(tmp_path)))
    evaluated = run_dir / "checkpoints" / best.tags["checkpoint"] / "world_model.safetensors"
    assert json.loads(agent_json.read_text())["sha256"]["world_model.safetensors"] == \
        hashlib.sha256(evaluated.read_bytes()).hexdigest()
    trained_after = run_dir / "checkpoints" / f"iter-{logged[-1]:06d}" / "world_model.safetensors"
    assert hashlib.sha256(trained_after.read_bytes()).digest() != hashlib.sha256(evaluated.read_bytes()).digest()
    uri = next(o.split("=", 1)[1] for o in debug_overrides if o.startswith("tracking.uri="))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # One fresh process (an interpreter start with torch and MLflow costs ≈10 s here): MLflow's own loader, then
    # the `priorzero eval` command line, as the console script runs it.
    code = ("import mlflow, pandas as pd\n"
            "m = mlflow.pyfunc.load_model('models:/priorzero-embedded@best')\n"
            "print('predicted', m.predict(pd.DataFrame([{'observation': 'You are in a kitchen. There is a door to "
            "the north.', 'valid_actions': ['go north', 'look', 'inventory']}]))[0], flush=True)\n"
            "import sys\n"
            "from priorzero.cli import main\n"
            "sys.argv = ['priorzero', 'eval', 'models:/priorzero-embedded@best', 'eval.num_episodes=2',"
            " 'eval.modes=[wm]']\n"
            "main()\n")
    played = subprocess.run([sys.executable, "-c", code], env=env, cwd=run_dir, capture_output=True, text=True,
                            timeout=300)
    assert played.returncode == 0, played.stdout[-2000:] + played.stderr[-3000:]
    (predicted,) = [line.split(" ", 1)[1] for line in played.stdout.splitlines() if line.startswith("predicted ")]
    assert predicted in ("go north", "look", "inventory")
    metrics = dict(line.split(" ", 1) for line in played.stdout.splitlines() if line.startswith("evals/"))
    assert "evals/wm/reward_mean" in metrics and float(metrics["evals/reward_max"]) >= 0
    assert list((run_dir / "transcripts").glob("eval-priorzero-embedded-best-*.txt"))


def test_collect_failure_is_retried_then_skips_the_rest_of_its_iteration(prefect_api, debug_overrides, monkeypatch):
    monkeypatch.setenv("PRIORZERO_FAULTS", "collect@2")

    state = priorzero(config="debug", overrides=[*debug_overrides, "run.stage_retries=1"], iterations=3,
                      return_state=True)

    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["collect-2"].state.is_failed()
    assert runs["collect-2"].run_count == 2  # the first try and one retry
    for skipped in ("train_world_model-2", "checkpoint-2"):
        assert runs[skipped].state.name == "Skipped"
        assert "collect-2 failed" in runs[skipped].state.message
    for completed in ("collect-3", "train_world_model-3", "checkpoint-3"):
        assert runs[completed].state.is_completed()
    assert state.result()["failed_iterations"] == [2]

    client, run = mlflow_run(debug_overrides)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/wm_total_loss")] == [1, 3]


def test_a_flow_whose_stages_fail_once_ends_at_the_checkpoint_and_metrics_of_the_plain_loop(
        prefect_api, debug_overrides, tiny_llm_dir, tmp_path, monkeypatch, one_thread):
    """One definition of an iteration drives the flow and `run_plain`, and a retried stage is the stage that
    failed: in parallel mode, with evaluation, LLM training and checkpoints each on their own period, collect
    dies after its first env step, world-model training after its first update and LLM training at its start,
    each once. Every retry completes; the same stages run in each iteration as in the plain loop without faults,
    and the runs end with identical checkpoints and metrics (MLflow's included)."""
    overrides = [*debug_overrides, "run.stage_retries=1", "schedule.mode=parallel", "llm.enabled=true",
                 f"llm.model={tiny_llm_dir}", "schedule.llm_train_freq=2", "eval.eval_freq=2", "run.checkpoint_freq=2",
                 "run.deterministic=true", "run.torch_threads=1"]
    cfg, _, _ = resolve_run("debug", overrides, 3, False, "plain")
    run_plain(cfg, tmp_path / "plain", iterations=3, progress=False)
    monkeypatch.setenv("PRIORZERO_FAULTS", "once:collect-step@2,once:train_world_model-update@2,once:train_llm@2")

    state = priorzero(config="debug", overrides=[*overrides, "run.name=flow"], iterations=3, return_state=True)

    assert state.is_completed(), state.message
    assert state.result()["failed_iterations"] == []
    runs = task_runs(state.state_details.flow_run_id)
    assert [runs[s].run_count for s in ("collect-2", "train_world_model-2", "train_llm-2")] == [2, 2, 2]
    dirs = [Path(state.result()["run_dir"]), tmp_path / "plain"]
    ran = [[sorted(k[len("timing/"):-2] for k in row if k.startswith("timing/") and k != "timing/iteration_s")
            for row in read_metrics(d)] for d in dirs]
    assert ran[0] == ran[1] == [["collect", "evaluate", "train_world_model"],
                                ["checkpoint", "collect", "train_llm", "train_world_model"],
                                ["checkpoint", "collect", "evaluate", "train_world_model"]]
    ours, plain = (ckpt.latest_valid(d / "checkpoints")[1]["files"] for d in dirs)
    assert ours == plain
    rows = [[{k: v for k, v in row.items() if not wall_clock(k)} for row in read_metrics(d)] for d in dirs]
    assert rows[0] == rows[1]
    assert rows[0][1]["train/wm_updates"] == 5  # the retry reports all 5 updates owed, the failed attempt's too
    client, run = mlflow_run(overrides)
    logged = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
              for key in run.data.metrics if not wall_clock(key)}
    assert logged == {key: [(int(row["iteration"]), row[key]) for row in rows[1] if key in row]
                      for key in {k for row in rows[1] for k in row if k != "iteration"}}


def test_the_final_checkpoint_is_of_the_last_finished_iteration_never_of_one_stopped_part_way(prefect_api,
                                                                                               debug_overrides):
    """It used to be labelled with the last iteration that completed while saving the models as they were,
    which could include a later iteration's partial work (Ctrl-C mid-iteration)."""
    cfg, run_dir, _ = resolve_run("debug", [*debug_overrides, "tracking.enabled=false"], 3, False, "final")
    trainer = open_trainer(cfg, run_dir, resume=False)
    tracker, progress = Tracker(cfg, run_dir, logging.getLogger("test")), Progress()
    try:
        trainer.begin_iteration(1)
        trainer.run_stage("collect", 1)
        trainer.finish_iteration(1)  # finished, with no checkpoint (a stage failed, or none was due)
        trainer.begin_iteration(2)
        trainer.run_stage("collect", 2)  # stopped here
        final_checkpoint(cfg, run_dir, progress, tracker)
        assert not ckpt.list_checkpoints(run_dir / "checkpoints")

        trainer.finish_iteration(2)
        final_checkpoint(cfg, run_dir, progress, tracker)
        (path,) = ckpt.list_checkpoints(run_dir / "checkpoints")
        assert ckpt.verify(path)["meta"]["iteration"] == 2 and progress.last_checkpoint == 2
    finally:
        close_trainer(run_dir)


def test_consecutive_failed_iterations_fail_the_flow_naming_stage_and_error(prefect_api, debug_overrides, monkeypatch):
    monkeypatch.setenv("PRIORZERO_FAULTS", "collect@1,collect@2")

    state = priorzero(config="debug", iterations=3, return_state=True, overrides=[
        *debug_overrides, "run.stage_retries=0", "run.max_consecutive_failed_iterations=2"])

    assert state.is_failed()
    assert "collect-2: RuntimeError: injected fault collect@2" in state.message
    assert "collect-3" not in task_runs(state.state_details.flow_run_id)
    _, run = mlflow_run(debug_overrides)
    assert run.info.status == "FAILED"


def test_parallel_mode_trains_world_model_and_llm_at_the_same_time(prefect_api, debug_overrides):
    state = priorzero(config="debug", iterations=1, return_state=True, overrides=[
        *debug_overrides, "llm.enabled=true", "llm.batch_size=2", "llm.updates_per_train=1", "eval.modes=[wm]",
        "schedule.mode=parallel", "schedule.llm_train_freq=1"])

    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    wm, llm = runs["train_world_model-1"], runs["train_llm-1"]
    assert wm.start_time < llm.end_time and llm.start_time < wm.end_time  # sequential would end one before the other


def test_a_stage_with_nothing_to_do_ends_completed_named_skipped_with_its_reason(debug_overrides):
    from priorzero.tasks.stages import _run_stage
    from priorzero_core.trainer import StageResult

    cfg, run_dir, _ = resolve_run("debug", [*debug_overrides, "tracking.enabled=false", "schedule.warmup_steps=1000"],
                                  3, False, "nothing-to-do")
    trainer = open_trainer(cfg, run_dir, resume=False)
    try:
        trainer.begin_iteration(1)
        collected = _run_stage("collect", str(run_dir), 1)
        assert isinstance(collected, StageResult) and collected.skipped is None  # did its work: its result
        state = _run_stage("train_world_model", str(run_dir), 1)
        assert state.is_completed() and state.name == "Skipped"
        assert state.message == "train_world_model-1: 5 env steps collected, training starts after 1000"
        assert state.result().skipped is not None and state.result().artifacts == {}
        it = Iteration(1)
        it.record("collect", Completed(data=collected))
        it.record("train_world_model", state)
        assert it.skip_reason("checkpoint") is None and it.failure() is None  # a skip of its own blocks nothing
    finally:
        close_trainer(run_dir)

"""kill -9 of the process running the flow at every stage, each followed by `priorzero resume`: nothing saved is
lost, and the resumed run ends exactly where the uninterrupted one does.

One run of the debug config is killed four times in a row (PRIORZERO_FAULTS=kill:<point>@<iteration>, see
priorzero_core/faults.py), each resume dying at the next point (mid-collect, mid world-model training, while
writing the checkpoint, after committing it but before its metrics are logged),
then a last resume finishes iteration 3. After every kill: exit -9, no process left, the last complete checkpoint
is the one expected, every file of a complete checkpoint and every replay file is byte-identical to before
(renamed aside when the iteration runs again), and MLflow holds exactly the steps of the iterations it was sent.
At the end: checkpoints 1-3 verify, and the last checkpoint, the replay files, logs/metrics.jsonl and the MLflow
metric histories are those of an uninterrupted run (wall-clock metrics aside).
"""


import json
from uuid import UUID

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client

from priorzero_core import checkpoint as ckpt
from priorzero_core.replay import ReplayBuffer
from priorzero_core.trainer import read_metrics

from .conftest import metric_steps, saved_files, tracking_uri, wait_gone
from measures import wall_clock

# (fault, last complete checkpoint when it strikes, the MLflow steps it leaves); each resumes from the one before.
KILLS = [
    ("kill:collect-step@2", 1, [1]),
    ("kill:train_world_model-update@2", 1, [1]),
    ("kill:checkpoint-write@2", 1, [1]),  # parts written, no manifest: only a .tmp dir exists
    ("kill:checkpoint-done@2", 2, [1]),  # checkpoint 2 committed, its metrics not yet sent: the resume sends them
]


def replay_steps(run_dir) -> int:
    return sum(len(seg.steps) for path in (run_dir / "replay").glob("iter-*.jsonl.gz")
               for seg in ReplayBuffer.read_segments(path))


def histories(uri: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} of the one MLflow run in `uri`, wall-clock metrics left out."""
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("priorzero-embedded").experiment_id])
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics if not wall_clock(key)}


def test_kill_9_at_every_stage_then_resume_loses_nothing_and_ends_as_the_uninterrupted_run(priorzero_cli, prefect_api,
                                                                                            debug_overrides, tmp_path):
    run_dir = tmp_path / "runs" / "crash"
    uri = tracking_uri(debug_overrides)
    overrides = [o for o in debug_overrides if not o.startswith("run.run_dir=")] + ["run.keep_checkpoints=10",
                                                                                   "run.deterministic=true"]
    command = ["train", "debug", "--iterations", "3", "--run-dir", str(run_dir), "--set", *overrides]
    saved: dict[str, str] = {}
    for fault, last_checkpoint, logged in KILLS:
        code, output, sid = priorzero_cli(*command, env={"PRIORZERO_FAULTS": fault})
        assert code == -9, f"{fault}: {output[-3000:]}"
        assert not wait_gone(sid), f"{fault}: processes of the killed run outlived it"
        now = saved_files(run_dir)
        assert {k: now.get(k) for k in saved} == saved, f"{fault}: a saved file changed or vanished"
        assert ckpt.latest_valid(run_dir / "checkpoints")[1]["meta"]["iteration"] == last_checkpoint, fault
        assert metric_steps(uri, "timing/iteration_s") == logged, fault
        if fault == "kill:checkpoint-write@2":
            assert list((run_dir / "checkpoints").glob(".tmp-iter-000002-*")), "the half-written checkpoint's temp dir"
        saved = now
        command = ["resume", str(run_dir)]

    code, output, sid = priorzero_cli(*command)

    assert code == 0 and "trained to iteration 3" in output, output[-3000:]
    assert not wait_gone(sid), "processes of the finished run outlived it"
    now = saved_files(run_dir)
    assert {k: now.get(k) for k in saved} == saved
    checkpoints = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert [ckpt.verify(p)["meta"]["iteration"] for p in checkpoints] == [1, 2, 3]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the dead writer's temp dir is cleared
    assert not list((run_dir / "checkpoints").glob("*.unverified-*"))  # no broken checkpoint was ever committed
    assert ckpt.verify(checkpoints[-1])["meta"]["replay_steps"] == replay_steps(run_dir)  # each step counted once
    # Two killed runs collected iteration 2 after the checkpoint-1 resume: each file was renamed aside by the
    # next resume, and each holds exactly what the live one holds.
    live = list((run_dir / "replay").glob("iter-000002-*.jsonl.gz"))
    aside = list((run_dir / "replay").glob("iter-000002-*.jsonl.gz.after-checkpoint-*"))
    assert len(live) == 1 and len(aside) == 2
    assert {p.read_bytes() for p in aside} == {live[0].read_bytes()}
    for key in ("timing/iteration_s", "collect/env_steps", "train/wm_total_loss"):
        assert metric_steps(uri, key) == [1, 2, 3], key
    # Each killed flow run stayed "Running" on the server until the resume after it marked it Crashed.
    flow_runs = json.loads((run_dir / "prefect_flow_runs.json").read_text())
    with get_client(sync_client=True) as client:
        states = [client.read_flow_run(UUID(run_id)).state.type.value for run_id in flow_runs]
    assert states == ["CRASHED"] * len(KILLS) + ["COMPLETED"]
    assert not (run_dir / "training.pid").exists()

    # The same command, never interrupted, in its own run dir and MLflow store.
    ref_dir, ref_uri = tmp_path / "runs" / "reference", f"sqlite:///{tmp_path / 'mlruns-reference' / 'mlflow.db'}"
    ref_overrides = [o for o in overrides if not o.startswith("tracking.uri=")] + [f"tracking.uri={ref_uri}"]
    code, output, _ = priorzero_cli("train", "debug", "--iterations", "3", "--run-dir", str(ref_dir), "--set",
                                    *ref_overrides)
    assert code == 0, output[-3000:]
    ours, ref = ckpt.verify(checkpoints[-1]), ckpt.verify(ckpt.list_checkpoints(ref_dir / "checkpoints")[-1])
    assert ours["files"] == ref["files"]  # sha256 of every part: weights, optimizer, RNGs, archive, episodes
    assert sorted(p.name for p in (run_dir / "replay").glob("iter-*.jsonl.gz")) == sorted(
        p.name for p in (ref_dir / "replay").glob("iter-*.jsonl.gz"))  # named by their content
    rows = [{k: v for k, v in r.items() if not wall_clock(k)} for r in read_metrics(run_dir)]
    assert rows == [{k: v for k, v in r.items() if not wall_clock(k)} for r in read_metrics(ref_dir)]
    assert histories(uri) == histories(ref_uri)


PPO_OVERRIDES = [
    "llm.enabled=true", "eval.modes=[wm]", "schedule.llm_train_freq=2", "schedule.mode=sequential",
    "ppo.use_orz_trainer=true", "ppo.rollout_batch_size=3", "ppo.train_batch_size=3", "ppo.n_samples_per_prompt=2",
    "ppo.critic_update_steps=2", "ppo.generate_max_tokens=8", "ppo.max_prompt_tokens=256", "ppo.history_length=1",
    "ppo.think=false", "ppo.actor_num_cpus=0.5", "run.keep_checkpoints=10",
]


@pytest.mark.slow  # Ray + a tiny LLM: about 3 min on a loaded 2-core box
def test_kill_9_in_adapt_and_ppo_train_then_resume_finishes_the_ppo_iteration(priorzero_cli, debug_overrides,
                                                                              tiny_llm_dir, tmp_path):
    """The PPO stages run Ray actors (policy, critic, reference, reward) beside the flow process: killing the
    flow process must take them along, and the resumed run redoes iteration 2's adapt + ppo_train."""
    run_dir = tmp_path / "runs" / "crash-ppo"
    uri = tracking_uri(debug_overrides)
    overrides = [o for o in debug_overrides if not o.startswith("run.run_dir=")]
    command = ["train", "debug", "--iterations", "2", "--run-dir", str(run_dir), "--set", *overrides,
               f"llm.model={tiny_llm_dir}", *PPO_OVERRIDES]
    saved: dict[str, str] = {}
    for fault in ("kill:adapt@2", "kill:ppo_train@2"):
        code, output, sid = priorzero_cli(*command, env={"PRIORZERO_FAULTS": fault})
        assert code == -9, f"{fault}: {output[-3000:]}"
        # Ray's raylet and GCS die with the driver; its two per-node agents notice within 2 s but first try to
        # flush logs to the dead GCS, and exit 40-70 s later (measured): wait for that, not forever.
        assert not wait_gone(sid, timeout=150), f"{fault}: processes (Ray?) of the killed run outlived it"
        now = saved_files(run_dir)
        assert {k: now.get(k) for k in saved} == saved, f"{fault}: a saved file changed or vanished"
        assert ckpt.latest_valid(run_dir / "checkpoints")[1]["meta"]["iteration"] == 1, fault
        saved = now
        command = ["resume", str(run_dir)]

    code, output, sid = priorzero_cli(*command)

    assert code == 0 and "trained to iteration 2" in output, output[-3000:]
    assert not wait_gone(sid, timeout=60), "processes of the finished run outlived it"
    now = saved_files(run_dir)
    assert {k: now.get(k) for k in saved} == saved
    path, manifest = ckpt.latest_valid(run_dir / "checkpoints")
    assert manifest["meta"]["iteration"] == 2 and (path / "ppo").is_dir()
    assert metric_steps(uri, "train/ppo_reward_mean") == [2]
    assert metric_steps(uri, "timing/iteration_s") == [1, 2]


def test_kill_9_of_a_run_on_prefects_temporary_server_takes_the_server_down_too(debug_overrides, prefect_home,
                                                                                tmp_path):
    """Without a Prefect server, `priorzero train` uses Prefect's temporary one (a uvicorn child process), which
    Prefect stops only from an atexit hook: after kill -9 it used to live on, re-parented to init."""
    import os
    import subprocess

    from priorzero.cli import LOCAL_PREFECT_API, _prefect_server_up

    from .conftest import PRIORZERO, session_processes

    if _prefect_server_up(LOCAL_PREFECT_API):
        pytest.skip("a Prefect server on the default port would be used instead of a temporary one")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PRIORZERO_FAULTS="kill:train_world_model@1")
    log = tmp_path / "train.out"  # not a pipe: a server left behind would hold it open
    with log.open("w") as out:
        proc = subprocess.Popen([PRIORZERO, "train", "debug", "--iterations", "1", "--set", *debug_overrides],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=300)
        output = log.read_text()
        assert proc.returncode == -9, output[-3000:]
        assert "ephemeral API" in output, output[-3000:]
        left = wait_gone(proc.pid)
        assert not left, f"outlived the killed run: {[p.cmdline() for p in left]}"
    finally:
        for leftover in session_processes(proc.pid):
            leftover.kill()

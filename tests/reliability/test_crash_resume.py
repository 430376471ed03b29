"""kill -9 of the process running the flow at every stage, each followed by `priorzero resume`: nothing saved is lost.

One run of the debug config is killed five times in a row (PRIORZERO_FAULTS=kill:<point>@<iteration>, see
priorzero_core/faults.py), each resume dying at the next point, then a last resume finishes iteration 3.
After every kill: exit -9, no process left, the last complete checkpoint is the one expected, every file
of a complete checkpoint and every replay file is byte-identical to before, and MLflow holds exactly the
steps of the checkpointed iterations. At the end: checkpoints 1-3 verify, every replay file was loaded,
and MLflow steps are 1, 2, 3 with no duplicates.
"""

import pytest

from priorzero_core import checkpoint as ckpt
from priorzero_core.replay import ReplayBuffer

from .conftest import metric_steps, saved_files, tracking_uri, wait_gone

# (fault, last complete checkpoint when it strikes); each resumes from the one before.
KILLS = [
    ("kill:collect@2", 1),
    ("kill:train_world_model@2", 1),
    ("kill:checkpoint@2", 1),
    ("kill:checkpoint-write@2", 1),  # parts written, no manifest: only a .tmp dir exists
    ("kill:evaluate@3", 2),
]


def replay_steps(run_dir) -> int:
    return sum(len(seg.steps) for path in (run_dir / "replay").glob("iter-*.jsonl.gz")
               for seg in ReplayBuffer.read_segments(path))


def test_kill_9_at_every_stage_then_resume_loses_no_checkpoint_replay_or_metric_step(priorzero_cli, debug_overrides,
                                                                                      tmp_path):
    run_dir = tmp_path / "runs" / "crash"
    uri = tracking_uri(debug_overrides)
    overrides = [o for o in debug_overrides if not o.startswith("run.run_dir=")] + ["run.keep_checkpoints=10"]
    command = ["train", "debug", "--iterations", "3", "--run-dir", str(run_dir), "--set", *overrides]
    saved: dict[str, str] = {}
    for fault, last_checkpoint in KILLS:
        code, output, sid = priorzero_cli(*command, env={"PRIORZERO_FAULTS": fault})
        assert code == -9, f"{fault}: {output[-3000:]}"
        assert not wait_gone(sid), f"{fault}: processes of the killed run outlived it"
        now = saved_files(run_dir)
        assert {k: now.get(k) for k in saved} == saved, f"{fault}: a saved file changed or vanished"
        assert ckpt.latest_valid(run_dir / "checkpoints")[1]["meta"]["iteration"] == last_checkpoint, fault
        assert metric_steps(uri, "timing/iteration_s") == list(range(1, last_checkpoint + 1)), fault
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
    assert ckpt.verify(checkpoints[-1])["meta"]["replay_steps"] == replay_steps(run_dir)  # no replay file dropped
    assert len(list((run_dir / "replay").glob("iter-000002-*"))) == 4  # three killed collects' files kept + the last
    for key in ("timing/iteration_s", "collect/env_steps", "train/wm_total_loss"):
        assert metric_steps(uri, key) == [1, 2, 3], key


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


def test_kill_9_of_a_run_on_prefects_temporary_server_takes_the_server_down_too(debug_overrides, tmp_path):
    """Without a Prefect server, `priorzero train` uses Prefect's temporary one (a uvicorn child process), which
    Prefect stops only from an atexit hook: after kill -9 it used to live on, re-parented to init."""
    import os
    import subprocess

    from priorzero.flows.cli import LOCAL_PREFECT_API, _prefect_server_up

    from .conftest import PRIORZERO, session_processes

    if _prefect_server_up(LOCAL_PREFECT_API):
        pytest.skip("a Prefect server on the default port would be used instead of a temporary one")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PRIORZERO_FAULTS="kill:train_world_model@1")
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

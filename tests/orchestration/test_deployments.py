"""End to end: a real `prefect server start`, `priorzero serve`, and `prefect deployment run priorzero/debug`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import AwaitingRetry

BIN = Path(sys.executable).parent


def wait_for_deployment(name: str, serve: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert serve.poll() is None, "priorzero serve exited"
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                time.sleep(0.5)
    raise AssertionError(f"deployment {name} not registered after {timeout:.0f} s")


def interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C for `priorzero serve` or a worker; killed if it has not stopped 30 s later."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_final(flow_run_id: UUID, timeout: float = 300):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout:.0f} s")


def test_a_served_deployment_run_killed_part_way_is_crashed_and_prefects_retry_resumes_its_run_dir(
        prefect_api, debug_overrides, tmp_path):
    """`prefect deployment run priorzero/debug`, its process killed with -9 after checkpoint 1 (the runner marks
    the flow run Crashed), then the UI's "Retry" (the same API call): the same flow run runs again, resumes
    the same run dir from checkpoint 1 and completes iteration 2."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
           "PRIORZERO_FAULTS": "kill:checkpoint-done@1"}
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen([str(BIN / "priorzero"), "serve", "--poll-seconds", "1"], env=env, cwd=tmp_path,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for name in ("priorzero/debug", "priorzero/zork", "priorzero/detective"):
            wait_for_deployment(name, serve)
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "priorzero/debug", "--param", "iterations=2",
             "--param", f"overrides={json.dumps(debug_overrides)}", "--watch", "--watch-timeout", "400"],
            env=env, capture_output=True, text=True, timeout=450)
        output = run.stdout + run.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        (run_dir,) = (tmp_path / "runs").iterdir()
        (flow_run_id,) = json.loads((run_dir / "prefect_flow_runs.json").read_text())
        crashed = wait_final(UUID(flow_run_id))
        assert crashed.state.is_crashed(), output
        with get_client(sync_client=True) as client:  # what the UI's Retry button sends
            client.set_flow_run_state(UUID(flow_run_id), AwaitingRetry(message="Retry from the UI"), force=False)
        retried = wait_final(UUID(flow_run_id))
    finally:
        interrupt(serve)

    assert retried.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
    assert retried.run_count == 2
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]  # no new run dir
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("iter-*"))][-1] == "iter-000002"
    assert "(resumed)" in (run_dir / "logs" / "flow.log").read_text()


def test_work_pool_deployments_run_on_a_process_worker_one_at_a_time_with_their_artifacts(
        prefect_api, debug_overrides, tmp_path):
    """`priorzero deploy --pool`, a real `prefect worker start --pool`, and two runs of priorzero/debug triggered
    together: the second waits for the first (concurrency limit 1); each runs in the deploy directory, from the
    module entrypoint, and leaves its artifacts. A run whose ROM is missing fails in one line, inside the flow."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
    env.pop("PRIORZERO_ROM_DIR", None)
    deploy = subprocess.run([str(BIN / "priorzero"), "deploy", "--pool", "test-pool"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("test-pool").type == "process"
        dep = client.read_deployment_by_name("priorzero/debug")
        assert dep.entrypoint == "priorzero.flows.priorzero_flow.priorzero" and dep.work_pool_name == "test-pool"
        assert dep.global_concurrency_limit.limit == 1 and set(dep.tags) == {"priorzero", "debug"}
        assert dep.version.startswith("0.1.0") and dep.job_variables["working_dir"] == str(tmp_path)
        # no run.run_dir: the runs go to runs/ under the deploy directory, wherever the worker was started
        params = {"iterations": 1, "overrides": [o for o in debug_overrides if not o.startswith("run.run_dir=")]}
        first, second = (client.create_flow_run_from_deployment(dep.id, parameters=params) for _ in range(2))
        missing = client.create_flow_run_from_deployment(client.read_deployment_by_name("priorzero/zork").id,
                                                         parameters={"iterations": 1})
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool"], env=env,
                                  cwd=tmp_path / "..", stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        runs = [wait_final(r.id, timeout=400) for r in (first, second, missing)]
    finally:
        interrupt(worker)
    log = (tmp_path / "worker.log").read_text()[-4000:]
    a, b, rom = runs
    assert a.state.is_completed() and b.state.is_completed(), log
    one, two = sorted((a, b), key=lambda r: r.start_time)
    assert two.start_time >= one.end_time  # never both at once
    assert one.name.startswith("debug-") and two.name.startswith("debug-")
    assert rom.state.is_failed() and "GameError" in rom.state.message and "rom_dir" in rom.state.message, rom.state
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        kinds = {art.type for art in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[a.id])))}
    assert {"progress", "table", "markdown"} <= kinds
    assert len(list((tmp_path / "runs").iterdir())) == 2  # both ran in the deploy directory

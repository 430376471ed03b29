"""Shared test fixtures: tiny models, games and servers used across test modules."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct as (model, tokenizer), converted once into the shared cache; never train it in place."""
    from priorzero_core.config import LLMConfig
    from priorzero_core.llm_prior import load_causal_lm

    return load_causal_lm(LLMConfig(backend="transformers"))


@pytest.fixture(scope="session")
def text_encoder():
    """The built-in all-MiniLM-L6-v2 encoder, frozen and cached; shared so it loads once per session."""
    from priorzero_core.text_encoder import TextEncoder

    return TextEncoder()


@pytest.fixture
def tiny_wm_config():
    """A world model small enough to train a few steps in a test (D 32, 2 layers, context 3)."""
    from priorzero_core.config import WorldModelConfig

    return WorldModelConfig(embed_dim=32, num_layers=2, num_heads=2, context_length=3, unroll_steps=4, support_size=5)


# ---------------------------------------------------------------- orchestration: Prefect server, MLflow store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 (free port, temporary PREFECT_HOME), once per session; its API URL.

    Faster than prefect_test_harness here (≈8 s vs ≈9 s) and the same server the end-to-end test serves against.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    log = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(f"{url}/health", proc, 90, log)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def prefect_api(prefect_server, tmp_path_factory):
    """This process's flows and clients talk to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_HOME: tmp_path_factory.mktemp("prefect-client")}):
        yield prefect_server


@pytest.fixture
def debug_overrides(tmp_path) -> list[str]:
    """The debug config cut down to seconds per iteration, with runs and a real MLflow sqlite store in tmp_path."""
    return [
        f"run.run_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "collect.steps_per_iteration=5",
        "collect.num_envs=1",
        "mcts.num_simulations=2",
        "llm.enabled=false",
        "eval.num_episodes=1",
        "eval.max_episode_steps=5",
        "run.stage_retry_delay_s=0",
    ]


@pytest.fixture(scope="session")
def rom_dir():
    """The Jericho game suite, which CI checks out beside the repository as ../shared/jericho-game-suite."""
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "jericho-game-suite").resolve()
    if not path.is_dir():
        pytest.fail(f"Jericho ROMs not found at {path}; check out the shared game suite beside the repository")
    return path

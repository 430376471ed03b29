"""Shared test fixtures: tiny models, games and servers used across test modules."""

import faulthandler
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import psutil
import pytest

# scripts/servers.py starts the local Prefect and MLflow servers tests need (a dev tool, not part of the package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

# The process ends with os._exit after Python's exit handlers (why: exit_guard's docstring); imported first so
# that its exit handler runs after every library's.
from exit_guard import pytest_sessionstart  # noqa: E402,F401


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Keep a fault handler on through Python's exit handlers (pytest's own stops with the session): a crash in
    one of them names the threads."""
    faulthandler.enable(file=sys.__stderr__, all_threads=True)


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


@pytest.fixture
def one_thread(monkeypatch):
    """For exactness tests that run training in this process, with run.deterministic and run.torch_threads=1.

    run.deterministic makes MKL reproducible (MKL_CBWR) only in a process whose MKL has not started yet; in the
    test process it has, and MKL's multi-threaded results vary with where the operands sit in memory. One thread
    does not vary. Both settings hold for the whole process: later tests get theirs back."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")  # what run.deterministic would set; undone after the test
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- orchestration: Prefect server, MLflow store


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 (free port, temporary PREFECT_HOME), once per session; its API URL.

    Quicker to start than prefect_test_harness (≈8 s vs ≈9 s), and the end-to-end test serves against it too.
    """
    from servers import prefect_server

    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as url:
        # Its database as it is now, migrated and with Prefect's block types registered, seeds the PREFECT_HOMEs of
        # the tests that start servers of their own (`prefect_home`): ≈7 s less to start each.
        template = tmp_path_factory.mktemp("prefect-template")
        with sqlite3.connect(home / "prefect.db") as src, sqlite3.connect(template / "prefect.db") as dst:
            src.backup(dst)  # consistent while the server runs
        if (home / "memo_store.toml").exists():
            shutil.copy(home / "memo_store.toml", template)
        _PREFECT_TEMPLATE.append(template)
        yield url


_PREFECT_TEMPLATE: list[Path] = []


@pytest.fixture
def prefect_home(prefect_server, tmp_path) -> Path:
    """A new PREFECT_HOME for a server of the test's own (`prefect server start`, or Prefect's temporary one),
    holding a copy of the session server's freshly migrated database instead of none."""
    home = tmp_path / "prefect-home"
    shutil.copytree(_PREFECT_TEMPLATE[0], home)
    return home


@pytest.fixture
def prefect_api(prefect_server, tmp_path_factory):
    """This process's flows and clients talk to the session's Prefect server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_HOME: tmp_path_factory.mktemp("prefect-client")}):
        yield prefect_server
        # Send buffered logs and events now: once the server stops, Prefect would retry them for minutes at exit.
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, its tables made once (≈3 s each time on this machine)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def debug_overrides(tmp_path, mlflow_store_template) -> list[str]:
    """The debug config cut down to seconds per iteration, with runs and a real MLflow sqlite store in tmp_path
    (a copy of an empty store, so that each test does not create its tables anew)."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_store_template, tmp_path / "mlruns" / "mlflow.db")
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
        "tracking.log_models=false",  # ≈2 s a run; the tests of the logged agents set it back
    ]


@pytest.fixture(scope="session")
def rom_dir():
    """The Jericho game suite, which CI checks out beside the repository as ../shared/jericho-game-suite."""
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "jericho-game-suite").resolve()
    if not path.is_dir():
        pytest.fail(f"Jericho ROMs not found at {path}; check out the shared game suite beside the repository")
    return path


# ---------------------------------------------------------------- PPO: a tiny causal LM, real Zork 1 segments


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer, random weights: PPO mechanics in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from priorzero_core.config import LLMConfig
    from priorzero_core.llm_prior import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(LLMConfig()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llm")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_llm_dir):
    """The tiny Llama as (model, tokenizer), like `smollm`: training mechanics without the 135M model's cost."""
    from transformers import AutoModelForCausalLM

    from priorzero_core.llm_prior import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval(), load_tokenizer(tiny_llm_dir)


@pytest.fixture(scope="session")
def zork_segment(rom_dir):
    """Twelve real Zork 1 walkthrough steps (a tree, an egg worth 5 points, a window, the kitchen worth 10)
    with saved states and 0.7 of the visits on the walkthrough's move."""
    from priorzero_core.config import GameConfig
    from priorzero_core.ppo.walkthrough import walkthrough_segment

    return walkthrough_segment(GameConfig(name="zork1", rom_dir=str(rom_dir)), 12)


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def still_running(pids: set[int], timeout: float = 60.0) -> list[psutil.Process]:
    """Processes among `pids` still alive after up to `timeout` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


@pytest.fixture
def process_tracker():
    """`(children, still_running)` helpers for leak checks."""
    return children, still_running

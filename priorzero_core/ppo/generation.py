"""Rollout generation: transformers `generate` inside the policy actor, or a vLLM OpenAI server on 127.0.0.1.

One engine is chosen at start-up (`make_engine`) and logged. The vLLM engine runs from its own venv
(scripts/setup_vllm_cpu.sh on CPU) and reloads the policy's weights from disk after every PPO step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config import PPOConfig
from ..errors import BackendUnavailable
from .adapter import STOP
from .strategy import free_port

logger = logging.getLogger(__name__)

VLLM_VENV_ENV = "PRIORZERO_VLLM_VENV"
VLLM_START_TIMEOUT_S = 600.0  # CPU engines compile and warm up for ~2 minutes
GENERATE_CHUNK = 32  # sequences per transformers generate call


@dataclass
class Sample:
    """One response: its tokens, its text and whether the model ended it (stop string or EOS) before the cap."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool


def trim_response(tokenizer: Any, ids: Sequence[int]) -> tuple[list[int], bool]:
    """Cut generated ids after EOS or `</answer>`; generate pads finished rows (with EOS when pad is EOS)."""
    kept: list[int] = []
    for token in ids:
        kept.append(int(token))
        if token == tokenizer.eos_token_id:
            return kept, True
        if ">" in tokenizer.decode([token]) and STOP in tokenizer.decode(kept):
            return kept, True
    return kept, False


@torch.no_grad()
def hf_generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], n: int, cfg: PPOConfig, seed: int) -> list[Sample]:
    """`n` sampled responses per prompt, grouped by prompt (all of one prompt's are consecutive)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    rows = [ids for ids in encoded for _ in range(n)]
    samples: list[Sample] = []
    for start in range(0, len(rows), GENERATE_CHUNK):
        chunk = rows[start : start + GENERATE_CHUNK]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.generate_max_tokens,
            stop_strings=[STOP],
            tokenizer=tokenizer,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for prompt_ids, generated in zip(chunk, out[:, width:].tolist()):
            ids, finished = trim_response(tokenizer, generated)
            samples.append(Sample(prompt_ids, ids, tokenizer.decode(ids, skip_special_tokens=True), finished))
    return samples


class GenerationEngine(ABC):
    name: str

    @abstractmethod
    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[Sample]: ...

    def update_weights(self, policy: Any) -> None:
        """Make the engine sample from the policy group's current weights."""

    def close(self) -> None:
        pass


class PolicyEngine(GenerationEngine):
    """Generation with transformers inside the policy actor: always in sync with the trained weights."""

    name = "transformers"

    def __init__(self, policy: Any):
        self.policy = policy

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[Sample]:
        return self.policy.map("generate", list(prompts), extra=(n, seed))  # prompts split over the policy's ranks


def default_vllm_venv(cfg: PPOConfig) -> Path:
    value = cfg.vllm_venv or os.environ.get(VLLM_VENV_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "priorzero" / "vllm-cpu-venv"


def vllm_python(cfg: PPOConfig) -> Optional[Path]:
    """A Python that imports vllm: the configured venv's, else this interpreter when vllm is installed here (CUDA)."""
    venv = default_vllm_venv(cfg)
    if (venv / "bin" / "python").is_file() and any(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        return venv / "bin" / "python"
    return Path(sys.executable) if importlib.util.find_spec("vllm") is not None else None


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = resp.read()
    return json.loads(data) if data else {}


class VLLMServerEngine(GenerationEngine):
    """vLLM's OpenAI-compatible server (started here from the vLLM venv, or already running at `vllm_url`).

    Weights travel through disk: the policy saves them under `weights_dir`, the server reloads them in place
    (`/collective_rpc reload_weights`, needs VLLM_SERVER_DEV_MODE=1) and drops its prefix cache.
    """

    name = "vllm"

    def __init__(self, cfg: PPOConfig, model_dir: Path, tokenizer: Any, weights_dir: Path, log_path: Path):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.weights_dir = weights_dir
        self._proc: Optional[subprocess.Popen] = None
        self._version = 0
        try:
            self.url = cfg.vllm_url.rstrip("/") if cfg.vllm_url else self._start(model_dir, log_path)
            self.model = self._served_model()
        except BaseException:
            self.close()
            raise

    def _start(self, model_dir: Path, log_path: Path) -> str:
        python = vllm_python(self.cfg)
        if python is None:
            raise BackendUnavailable(
                f"vllm is not installed (looked in {default_vllm_venv(self.cfg)} and this venv); run scripts/setup_vllm_cpu.sh"
            )
        port = free_port()
        cpu = not torch.cuda.is_available()
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # the project's venv must not leak into vLLM's
            env.pop(key, None)
        max_len = self.cfg.max_prompt_tokens + self.cfg.generate_max_tokens + 16
        # The module entry point, not the `vllm` CLI: the CLI looks up the "vllm" distribution, which vllm-cpu is not.
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "bfloat16" if cpu else "auto", "--enable-prefix-caching", "--max-model-len", str(max_len),
               "--served-model-name", "policy", "--disable-uvicorn-access-log"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BackendUnavailable(f"the vLLM server exited with {self._proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    logger.info("vLLM engine up at %s after %.0f s (log %s)", url, time.monotonic() - t0, log_path)
                    return url
            except OSError:
                time.sleep(1.0)
        raise BackendUnavailable(f"the vLLM server is not healthy after {VLLM_START_TIMEOUT_S:.0f} s (log {log_path})")

    def _served_model(self) -> str:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=10) as resp:
            return json.loads(resp.read())["data"][0]["id"]

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[Sample]:
        encoded = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        body = {
            "model": self.model, "prompt": encoded, "n": n, "max_tokens": self.cfg.generate_max_tokens,
            "temperature": self.cfg.temperature, "top_p": 1.0, "seed": seed, "stop": [STOP],
            "include_stop_str_in_output": True, "return_token_ids": True, "skip_special_tokens": False,
        }
        choices = sorted(_post(f"{self.url}/v1/completions", body, timeout=3600)["choices"], key=lambda c: c["index"])
        samples = []
        for i, choice in enumerate(choices):
            ids = list(choice.get("token_ids") or self.tokenizer.encode(choice["text"], add_special_tokens=False))
            finished = choice.get("finish_reason") == "stop"
            if not ids:  # an immediate EOS: keep it so the response has a token to train on
                ids = [self.tokenizer.eos_token_id]
            samples.append(Sample(encoded[i // n], ids, self.tokenizer.decode(ids, skip_special_tokens=True), finished))
        return samples

    def update_weights(self, policy: Any) -> None:
        self._version += 1
        target = self.weights_dir / f"v{self._version}"
        policy.call_one("save_pretrained", str(target))
        _post(f"{self.url}/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(target)}}, timeout=600)
        _post(f"{self.url}/reset_prefix_cache", {}, timeout=60)
        shutil.rmtree(self.weights_dir / f"v{self._version - 1}", ignore_errors=True)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_engine(cfg: PPOConfig, policy: Any, model_dir: Path, tokenizer: Any, work_dir: Path) -> GenerationEngine:
    """`auto` picks vLLM for a configured `vllm_url`, or on CUDA when vllm is installed; CPU runs opt in
    with `generation_backend: vllm` (the engine's ~2 minute start only pays off on long runs)."""
    auto_vllm = bool(cfg.vllm_url) or (torch.cuda.is_available() and vllm_python(cfg) is not None)
    if cfg.generation_backend == "vllm" or cfg.vllm_required or (cfg.generation_backend == "auto" and auto_vllm):
        engine: Optional[VLLMServerEngine] = None
        try:
            engine = VLLMServerEngine(cfg, model_dir, tokenizer, work_dir / "vllm-weights", work_dir / "logs" / "vllm.log")
            engine.update_weights(policy)  # the policy may start from weights other than model_dir's
            logger.info("PPO generation: vLLM at %s", engine.url)
            return engine
        except BaseException as err:
            if engine is not None:  # a server that started must never outlive a failed set-up
                engine.close()
            if not isinstance(err, (BackendUnavailable, OSError)):
                raise
            if cfg.vllm_required or cfg.generation_backend == "vllm":
                raise BackendUnavailable(f"vLLM generation unavailable: {err}") from None
            logger.warning("vLLM generation unavailable (%s); generating with transformers in the policy actor", err)
    logger.info("PPO generation: transformers in the policy actor")
    return PolicyEngine(policy)

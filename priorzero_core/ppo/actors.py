"""Ray actor groups for PPO: policy (trainable LLM), critic (trunk + value head), reference (frozen), reward.

Actor classes are plain Python classes, so a test can also run one in-process; `ActorGroup` makes them
Ray actors, spread over the cluster's nodes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..config import GameConfig, LLMConfig, PPOConfig
from ..llm_prior import load_causal_lm
from .adapter import PromptRecord
from .experience import Rollout
from .generation import Sample, hf_generate
from .losses import approx_kl, masked_mean, policy_loss, value_loss
from .models import Critic, response_logprobs
from .reward import Judgement, RewardFunction
from .strategy import actor_device, evaluating, make_strategy

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _setup_process(num_cpus: float) -> None:
    torch.set_num_threads(max(1, int(num_cpus)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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


def micro_batches(mb: Rollout, size: int) -> Iterator[tuple[Rollout, float, bool]]:
    """A minibatch as micro-batches of `size` responses: (micro-batch, its share of the minibatch's response
    tokens, whether it is the last). The losses are token means, so the shares make the accumulated gradient the
    minibatch's own while activations scale with `size`."""
    tokens = float(mb.action_mask.sum().clamp(min=1))
    starts = range(0, len(mb), size)
    for start in starts:
        micro = mb.select(torch.arange(start, min(start + size, len(mb))))
        yield micro, float(micro.action_mask.sum()) / tokens, start == starts[-1]


class PolicyActor:
    """Trains the LLM with the clipped PPO objective; also generates rollouts with transformers."""

    def __init__(self, ppo: PPOConfig, llm: LLMConfig, weights: Optional[StateDict] = None, seed: int = 0):
        _setup_process(ppo.actor_num_cpus)
        self.cfg = ppo
        lm, self.tokenizer = _load_lm(llm, weights)
        self.strategy = make_strategy(ppo, actor_device())
        self.model = self.strategy.prepare(lm, ppo.actor_lr)
        self.generator = torch.Generator().manual_seed(seed)

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
                for micro, weight, last in micro_batches(mb, cfg.micro_train_batch_size):
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
                sums["grad_norm"] += self.model.step()
                steps += 1
        module.eval()
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def state_dict(self) -> StateDict:
        return _cpu_state(self.model.module)

    def save_pretrained(self, directory: str) -> None:
        """HF checkpoint layout (config + safetensors), what vLLM reloads."""
        self.model.module.save_pretrained(directory)

    def save(self, directory: str) -> None:
        self.model.save(Path(directory))

    def load(self, directory: str) -> None:
        self.model.load(Path(directory))


class CriticActor:
    """Estimates per-token values; trained with the clipped value loss."""

    def __init__(self, ppo: PPOConfig, llm: LLMConfig, weights: Optional[StateDict] = None, seed: int = 0):
        _setup_process(ppo.actor_num_cpus)
        self.cfg = ppo
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
                for micro, weight, last in micro_batches(mb, cfg.micro_train_batch_size):
                    with self.model.autocast():
                        values = module(micro.sequences.to(device), micro.attention_mask.to(device), micro.response_len)
                    loss = value_loss(values, micro.values.to(device), micro.returns.to(device),
                                      micro.action_mask.to(device), cfg.value_clip)
                    self.model.backward(loss * weight, last=last)
                    total += loss.item() * weight
                self.model.step()
                steps += 1
        module.eval()
        return {"value_loss": total / max(steps, 1)}

    def save(self, directory: str) -> None:
        self.model.save(Path(directory))

    def load(self, directory: str) -> None:
        self.model.load(Path(directory))


class ReferenceActor:
    """The frozen policy the KL terms compare against."""

    def __init__(self, ppo: PPOConfig, llm: LLMConfig, weights: Optional[StateDict] = None, seed: int = 0):
        _setup_process(ppo.actor_num_cpus)
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
    """`num_actors` Ray actors of one class with narrow fan-out calls (ORZ's PPORayActorGroup, minus DP ranks)."""

    def __init__(self, cls: type, num_actors: int, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 scheduling_strategy: Any = "SPREAD", **kwargs: Any):
        import ray

        remote = ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=scheduling_strategy)
        self.name = cls.__name__
        self.actors = [remote.remote(*args, **kwargs) for _ in range(num_actors)]

    def call_one(self, method: str, *args: Any) -> Any:
        """Run `method` on the first actor and wait for it."""
        import ray

        return ray.get(getattr(self.actors[0], method).remote(*args))

    def submit(self, method: str, *args: Any) -> Any:
        """Start `method` on the first actor; returns its object ref."""
        return getattr(self.actors[0], method).remote(*args)

    def map(self, method: str, *columns: Sequence[Any]) -> list[Any]:
        """Split equal-length argument lists across the actors, call `method` on each share, concatenate."""
        import ray

        n = len(columns[0])
        size = -(-n // len(self.actors))
        refs = [getattr(actor, method).remote(*(c[i : i + size] for c in columns))
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

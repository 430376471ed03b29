"""How a model trains: plain torch (AdamW, fp32 or bf16 autocast) or DeepSpeed (ZeRO-2, bf16), behind one interface."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..config import PPOConfig
from ..errors import BackendUnavailable
from .models import enable_checkpointing

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
DEEPSPEED_TAG = "ppo"


class Trainable(ABC):
    """A model with its optimizer; `module` is the plain nn.Module for forwards and weights."""

    module: nn.Module

    @abstractmethod
    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Add `loss`'s gradients; `last`: the final micro-batch before `step` (gradient accumulation)."""

    @abstractmethod
    def step(self) -> float:
        """Clip, apply and clear the gradients accumulated since the last step; returns the gradient norm."""

    @abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager: ...

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @abstractmethod
    def load(self, directory: Path) -> None: ...


class Strategy(ABC):
    name: str

    def __init__(self, cfg: PPOConfig, device: torch.device):
        self.cfg = cfg
        self.device = device

    @abstractmethod
    def prepare(self, model: nn.Module, lr: float) -> Trainable: ...

    def _checkpointing(self, model: nn.Module) -> None:
        if self.cfg.gradient_checkpointing:
            enable_checkpointing(model)


def warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """ORZ's constant-with-warmup: the learning rate ramps linearly to its value over the first `steps` updates
    (the first takes 1/steps of it), then stays."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(steps, 1)))


class _TorchTrainable(Trainable):
    def __init__(self, module: nn.Module, lr: float, grad_clip: float, bf16: bool, device: torch.device,
                 warmup_steps: int = 0):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = warmup(self.optimizer, warmup_steps)
        self.grad_clip = grad_clip
        self.bf16 = bf16
        self.device_type = device.type

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def step(self) -> float:
        if data_parallel_ranks() > 1:  # each rank holds its share's gradient: the minibatch's is their sum
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch._utils._flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            for p, summed in zip(self.params, torch._utils._unflatten_dense_tensors(flat, grads)):
                p.grad = summed
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def save(self, directory: Path) -> None:
        if data_parallel_ranks() > 1 and torch.distributed.get_rank() != 0:
            return  # every rank holds the same weights and optimizer state: the first writes them
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(directory / WEIGHTS_FILE))  # handles tied embeddings
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        torch.save(self.scheduler.state_dict(), directory / SCHEDULER_FILE)

    def load(self, directory: Path) -> None:
        load_model(self.module, str(directory / WEIGHTS_FILE))
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=True))
        if (directory / SCHEDULER_FILE).is_file():
            self.scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))


class TorchStrategy(Strategy):
    name = "torch"

    def prepare(self, model: nn.Module, lr: float) -> Trainable:
        self._checkpointing(model)
        bf16 = bool(self.cfg.bf16)
        return _TorchTrainable(model.to(self.device), lr, self.cfg.grad_clip, bf16, self.device, self.cfg.num_warmup_steps)


class _DeepSpeedTrainable(Trainable):
    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module
        self.ranks = data_parallel_ranks()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # The engine is configured without accumulation steps (each loss already carries its token share);
        # this tells ZeRO-2 when a minibatch's gradients are complete, so step() applies them once. ZeRO
        # averages the ranks' gradients where the shares need their sum: hence the factor.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.ranks)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds bf16 weights already

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")


def data_parallel_ranks() -> int:
    """How many data-parallel ranks this process trains with (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DeepSpeedStrategy(Strategy):
    """ZeRO-2 + bf16 on one rank per actor process; on CPU with the gloo backend and torch's AdamW."""

    name = "deepspeed"

    def __init__(self, cfg: PPOConfig, device: torch.device):
        super().__init__(cfg, device)
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as err:
            raise BackendUnavailable(f"DeepSpeed is not importable ({err}); pip install 'priorzero[deepspeed]'") from None
        self._deepspeed = deepspeed
        if device.type == "cpu":
            # DeepSpeed's CPU backend compiles its shared-memory all-reduce op (C++, a minute or two on 2 cores,
            # again on every fresh machine) when it starts; gloo reduces (one rank: nothing to reduce) without
            # it. Its op table is where DeepSpeed looks whether that op can be built.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not torch.distributed.is_initialized():
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                               ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")

    def prepare(self, model: nn.Module, lr: float) -> Trainable:
        self._checkpointing(model)
        config = {
            "train_micro_batch_size_per_gpu": min(self.cfg.micro_train_batch_size, self.cfg.train_batch_size),
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip,
            "bf16": {"enabled": self.cfg.bf16 is not False},
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        params = [p for p in model.to(self.device).parameters() if p.requires_grad]
        engine, *_ = self._deepspeed.initialize(model=model, model_parameters=params, config=config,
                                                lr_scheduler=lambda opt: warmup(opt, self.cfg.num_warmup_steps))
        return _DeepSpeedTrainable(engine)


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def make_strategy(cfg: PPOConfig, device: torch.device) -> Strategy:
    """`auto`: DeepSpeed on CUDA when installed, torch otherwise; `deepspeed_required` turns a fallback into an error."""
    want = cfg.strategy
    if want == "auto":
        want = "deepspeed" if (device.type == "cuda" and deepspeed_available()) or cfg.deepspeed_required else "torch"
    if want == "deepspeed":
        try:
            strategy: Strategy = DeepSpeedStrategy(cfg, device)
        except BackendUnavailable as err:
            if cfg.deepspeed_required or cfg.strategy == "deepspeed":
                raise
            logger.warning("%s; training with the torch strategy", err)
            strategy = TorchStrategy(cfg, device)
    else:
        strategy = TorchStrategy(cfg, device)
    logger.info("PPO strategy: %s on %s (bf16 %s, gradient checkpointing %s)", strategy.name, device,
                cfg.bf16 if cfg.bf16 is not None else strategy.name == "deepspeed", cfg.gradient_checkpointing)
    return strategy


def actor_device() -> torch.device:
    """The GPU Ray assigned to this actor (it sets CUDA_VISIBLE_DEVICES to it), else the CPU: an actor that asked
    for no GPU never takes one, even where the machine has some."""
    import ray

    assigned = ray.get_gpu_ids() if ray.is_initialized() else []
    return torch.device("cuda") if assigned and torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, KV cache allowed) for a forward, restoring the previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)

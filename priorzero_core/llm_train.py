"""Train the prior's LLM from search: SFT toward MCTS visit distributions, PPO-clip RFT on executed actions."""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn
from transformers import DynamicCache

from .config import LLMConfig
from .errors import CheckpointError, ConfigError
from .llm_prior import (
    LabelLogprobs,
    LLMPrior,
    encode_labels,
    encode_prompt,
    label_pass,
    log_prior,
    pad_token_id,
    prefix_pass,
    resolve_dtype,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "llm_weights.safetensors"
# Label rows x prompt tokens backpropagated at once (their copies of the prompt's keys/values dominate memory).
TRAIN_CACHED_TOKENS = 4096
OPTIMIZER_FILE = "llm_optimizer.pt"
METRIC_KEYS = (
    "train/llm_sft_loss",
    "train/llm_rft_loss",
    "train/llm_total_loss",
    "train/llm_kl",
    "train/llm_grad_norm",
)


@dataclass
class LLMSample:
    """One searched step: the rendered prompt, its valid actions, MCTS visits, the executed action and its advantage."""

    prompt: str
    valid_actions: list[str]
    visit_dist: np.ndarray  # over valid_actions, sums to 1
    action_index: int
    advantage: float  # n-step value target minus the world model's value; normalised per train call

    def __post_init__(self) -> None:
        if len(self.visit_dist) != len(self.valid_actions):
            raise ValueError(
                f"visit_dist has {len(self.visit_dist)} entries for {len(self.valid_actions)} valid actions"
            )
        if not np.isclose(np.sum(self.visit_dist), 1.0, atol=1e-3):
            total = float(np.sum(self.visit_dist))
            raise ValueError(f"visit_dist must sum to 1 (normalise the visit counts), got {total:.4f}")
        if not 0 <= self.action_index < len(self.valid_actions):
            raise ValueError(f"action_index {self.action_index} is outside the {len(self.valid_actions)} valid actions")


@dataclass(frozen=True)
class _Encoded:
    prompt: list[int]
    labels: list[list[int]]  # every valid action's ` <a><eos>` (the prompt ends with `Action:`)
    visits: torch.Tensor
    action_index: int


def _executed_tokens(lp: LabelLogprobs, row: int) -> torch.Tensor:
    return lp.tokens[row][lp.mask[row]]


class LLMTrainer:
    """Updates the prior's own module (full or LoRA), so MCTS scores with the trained weights right away."""

    def __init__(self, prior: LLMPrior, cfg: LLMConfig, seed: int = 0):
        if cfg.sft_weight == 0 and cfg.rft_weight == 0:
            raise ConfigError("llm.sft_weight and llm.rft_weight are both 0: set one above 0 or llm.train: false")
        self.prior = prior
        self.cfg = cfg
        self.tokenizer = prior.tokenizer
        self._pad_id = pad_token_id(self.tokenizer)
        self._lm = prior.trainable_model()
        self._reference: Optional[nn.Module] = None
        self.model: nn.Module
        if cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            # Injects adapters into self._lm in place, so the prior scores with them too.
            self.model = get_peft_model(self._lm, lora)
        else:
            self.model = self._lm
            self._reference = copy.deepcopy(self._lm).requires_grad_(False).eval()
        self.model.eval()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._params, lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self._device = next(self._lm.parameters()).device
        weights_dtype = next(self._lm.parameters()).dtype
        self._compute_dtype = resolve_dtype(cfg.train_dtype, cfg, self._device)
        self._use_autocast = self._compute_dtype != weights_dtype
        if self._use_autocast:
            log.info("LLM training: forwards and backwards in %s (autocast), weights in %s",
                     self._compute_dtype, weights_dtype)

    def _autocast(self) -> torch.autocast:
        """`llm.train_dtype` as an autocast context (disabled where it is the weights' own dtype)."""
        return torch.autocast(self._device.type, dtype=self._compute_dtype, enabled=self._use_autocast)

    # ------------------------------------------------------------------------------------------ forwards

    def _chunks(self, e: _Encoded) -> list[list[int]]:
        """The label rows of one sample, in the chunks `_accumulate` backpropagates one at a time."""
        rows = list(range(len(e.labels))) if self.cfg.sft_weight > 0 else [e.action_index]
        per_chunk = max(1, TRAIN_CACHED_TOKENS // len(e.prompt))
        return [rows[start : start + per_chunk] for start in range(0, len(rows), per_chunk)]

    @torch.no_grad()
    def _executed_logprobs(self, encoded: Sequence[_Encoded], reference: bool) -> list[torch.Tensor]:
        """Token log-probs of each executed label under the current policy or the frozen reference.

        Computed as `_accumulate` computes the new ones: one prompt at a time, with the executed label's chunk
        of labels. Under bf16 autocast another batch shape rounds differently (up to 0.16 nat a token on the
        test prompts, prompts batched with padding), which the RFT ratio and KL would read as a policy change.
        """
        lm = self._reference if reference and self._reference is not None else self._lm
        adapter_off = self.model.disable_adapter() if reference and self._reference is None else nullcontext()
        out = []
        with adapter_off:  # LoRA: the base model is the reference
            for e in encoded:
                chunk = next(c for c in self._chunks(e) if e.action_index in c)
                cache, prefix_mask = prefix_pass(lm, [e.prompt], self._pad_id)
                lp = label_pass(lm, cache, prefix_mask, [e.prompt], [[e.labels[k] for k in chunk]], self._pad_id)[0]
                out.append(_executed_tokens(lp, chunk.index(e.action_index)))
        return out

    # ------------------------------------------------------------------------------------------ losses

    def _label_scores(self, lp: LabelLogprobs) -> torch.Tensor:
        """The labels' scores as the prior computes them (`llm.label_score`)."""
        return lp.score(self.cfg.label_score, self.cfg.label_length_penalty)

    def _rft_loss(
        self, new: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, advantage: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PPO-clip on the executed action's label tokens plus k3 KL to the reference; returns (loss, kl)."""
        ratio = torch.exp(new - old)
        clip = self.cfg.rft_clip
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
        log_ref_ratio = ref - new
        kl = (torch.exp(log_ref_ratio) - log_ref_ratio - 1).mean()
        return -surrogate.mean() + self.cfg.rft_kl_coef * kl, kl

    def _accumulate(
        self,
        batch: Sequence[int],
        encoded: Sequence[_Encoded],
        old: Sequence[torch.Tensor],
        ref: Sequence[torch.Tensor],
        advantages: torch.Tensor,
    ) -> dict[str, float]:
        """Backward over one minibatch, one sample at a time and a bounded chunk of its labels at a time.

        Backpropagating through all K labels at once keeps K copies of the prompt's keys/values per layer
        for the backward pass (Zork: 55 labels x 512 tokens, over 10 GB for SmolLM2-135M). The SFT loss couples
        the labels only through the softmax over their scores m (`llm.label_score`), so a no-grad pass gives
        g = dL/dm = (softmax(m / T) - visits) / T, and each chunk backpropagates sum(g_chunk * m_chunk): the
        same gradient, with memory bounded by TRAIN_CACHED_TOKENS. The executed label's RFT term goes with
        its chunk. The prompt itself runs forward and backward once per sample.
        """
        use_sft, use_rft = self.cfg.sft_weight > 0, self.cfg.rft_weight > 0
        totals = {"sft": 0.0, "rft": 0.0, "kl": 0.0}
        scale = 1.0 / len(batch)
        for i in batch:
            e = encoded[i]
            # The prompt runs forward once; each chunk backpropagates into detached copies of its keys/values,
            # whose summed gradients then flow through the prompt's graph in one backward.
            cache, prefix_mask = prefix_pass(self._lm, [e.prompt], self._pad_id)
            prompt_kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            leaves = [t.detach().requires_grad_() for t in prompt_kv]

            def label_logprobs(labels: list[list[int]]) -> LabelLogprobs:
                leaf_cache = DynamicCache(ddp_cache_data=zip(leaves[0::2], leaves[1::2]), config=self._lm.config)
                return label_pass(self._lm, leaf_cache, prefix_mask, [e.prompt], [labels], self._pad_id)[0]

            weights = None
            if use_sft:
                with torch.no_grad():
                    scores = self._label_scores(label_logprobs(e.labels))
                logq = log_prior(scores, self.cfg.prior_temperature)
                visits = e.visits.to(logq.device)
                totals["sft"] += float(-(visits * logq).sum())
                weights = (logq.exp() - visits) / self.cfg.prior_temperature
            for chunk in self._chunks(e):
                lp = label_logprobs([e.labels[k] for k in chunk])
                loss = torch.zeros((), device=lp.tokens.device)
                if weights is not None:
                    loss = loss + self.cfg.sft_weight * (weights[chunk] * self._label_scores(lp)).sum()
                if use_rft and e.action_index in chunk:
                    new = _executed_tokens(lp, chunk.index(e.action_index))
                    rft, kl = self._rft_loss(new, old[i].to(new.device), ref[i].to(new.device), float(advantages[i]))
                    loss = loss + self.cfg.rft_weight * rft
                    totals["rft"] += rft.item()
                    totals["kl"] += kl.item()
                (loss * scale).backward()
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
            torch.autograd.backward(prompt_kv, grads)
        return {key: value * scale for key, value in totals.items()}

    # ------------------------------------------------------------------------------------------ public

    def _encode(self, sample: LLMSample) -> _Encoded:
        visits = torch.as_tensor(np.asarray(sample.visit_dist, dtype=np.float32))
        return _Encoded(
            encode_prompt(self.tokenizer, sample.prompt),
            encode_labels(self.tokenizer, sample.valid_actions),
            visits,
            sample.action_index,
        )

    def train(self, samples: Sequence[LLMSample]) -> dict[str, float]:
        """`updates_per_train` AdamW steps on random minibatches of `batch_size`; returns the mean metrics.
        Advantages are normalised across `samples` when there are several."""
        if not samples:
            raise ValueError("LLM training needs at least one sample")
        encoded = [self._encode(s) for s in samples]
        advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        if len(samples) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        # `old` and `ref` are taken under the same autocast as the updates, so the RFT ratio compares like with like.
        old: list[torch.Tensor] = []
        ref: list[torch.Tensor] = []
        if self.cfg.rft_weight > 0:
            with self._autocast():
                old = self._executed_logprobs(encoded, reference=False)
                ref = self._executed_logprobs(encoded, reference=True)

        sums = dict.fromkeys(("sft", "rft", "kl", "total", "grad_norm"), 0.0)
        self.model.train()
        try:
            for _ in range(self.cfg.updates_per_train):
                batch = torch.randperm(len(samples), generator=self.generator)[: self.cfg.batch_size].tolist()
                self.optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    step = self._accumulate(batch, encoded, old, ref, advantages)
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip)
                self.optimizer.step()
                step["total"] = self.cfg.sft_weight * step["sft"] + self.cfg.rft_weight * step["rft"]
                step["grad_norm"] = float(grad_norm)
                for key, value in step.items():
                    sums[key] += value
        finally:
            self.model.eval()
            self.prior.sync_weights(self.model)  # also after a failed update: some steps may have been applied
        n = self.cfg.updates_per_train
        return dict(zip(METRIC_KEYS, (sums[k] / n for k in ("sft", "rft", "total", "kl", "grad_norm"))))

    def _weights(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        return {name: t.detach().contiguous() for name, t in state.items()}

    def save_state(self, directory: str | Path) -> None:
        """Write the trained weights (LoRA adapters or the full model) as safetensors and the optimizer state."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        kind = "lora" if self.cfg.lora.enabled else "full"
        if kind == "lora":
            save_file(self._weights(), directory / WEIGHTS_FILE, metadata={"kind": kind})
        else:
            # Not safetensors' save_model: its file lists tied-weight aliases in the header's metadata, whose key
            # order varies from save to save, so two identical models made different files.
            state, tensors, seen = self._lm.state_dict(), {}, set()
            for name in sorted(state):  # tied weights (embeddings = LM head) once, under the first name
                if state[name].data_ptr() not in seen:
                    seen.add(state[name].data_ptr())
                    tensors[name] = state[name].detach().contiguous()
            save_file(tensors, directory / WEIGHTS_FILE, metadata={"kind": kind})
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load_state(self, directory: str | Path) -> None:
        """Restore what `save_state` wrote and push the weights to the prior."""
        directory = Path(directory)
        weights, optimizer = directory / WEIGHTS_FILE, directory / OPTIMIZER_FILE
        for path in (weights, optimizer):
            if not path.is_file():
                raise CheckpointError(f"LLM checkpoint file {path} is missing")
        self.load_weights(weights)
        self.optimizer.load_state_dict(torch.load(optimizer, weights_only=True))

    def load_weights(self, weights: str | Path) -> None:
        """Load the weights file `save_state` wrote (LoRA adapters or the full model) and push them to the prior."""
        weights = Path(weights)
        kind = "lora" if self.cfg.lora.enabled else "full"
        with safe_open(str(weights), framework="pt") as f:
            saved = (f.metadata() or {}).get("kind")
        if saved != kind:
            raise CheckpointError(
                f"{weights} holds {saved} LLM weights but llm.lora.enabled is {self.cfg.lora.enabled}"
            )
        if kind == "lora":
            from peft import set_peft_model_state_dict

            device = next(self._lm.parameters()).device
            set_peft_model_state_dict(self.model, load_file(weights, device=str(device)))
        else:
            load_model(self._lm, str(weights))
        self.prior.sync_weights(self.model)

"""The networks PPO runs: response log-probs of a causal LM, and the critic (LM trunk + value head)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .experience import position_ids


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing; transformers renamed the method (gradient_ -> activation_)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


LOGIT_ROWS = 8  # rows of [rows, response, vocabulary] fp32 logits made at a time


def response_logprobs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                      rows: int = LOGIT_ROWS) -> torch.Tensor:
    """log π(token) for the last `response_len` tokens of each row, [B, R] in fp32.

    The LM head runs on `rows` rows at a time, so fp32 full-vocabulary logits never exist for the whole batch
    (4.9 GB at 512 responses × 49 tokens × 49k words); under autograd each block is recomputed in the backward
    instead of kept."""
    hidden = model.base_model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).last_hidden_state[:, -response_len - 1 : -1]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    targets = sequences[:, -response_len:]

    def block(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits.gather(-1, t[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(block, hidden[i : i + rows], targets[i : i + rows], use_reentrant=False) if grad
             else block(hidden[i : i + rows], targets[i : i + rows]) for i in range(0, len(hidden), rows)]
    return torch.cat(parts)


class Critic(nn.Module):
    """Values from the LM's own trunk (its LM head dropped) and a zero-initialised linear head."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.trunk = lm.base_model
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        enable_checkpointing(self.trunk)

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """V(state before each response token), [B, R] in fp32."""
        hidden = self.trunk(
            input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
        ).last_hidden_state
        return self.value_head(hidden[:, -response_len - 1 : -1]).squeeze(-1).float()

"""The networks PPO runs: response log-probs of a causal LM, and the critic (LM trunk + value head)."""

from __future__ import annotations

import torch
from torch import nn

from .experience import position_ids


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing; transformers renamed the method (gradient_ -> activation_)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def response_logprobs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """log π(token) for the last `response_len` tokens of each row, [B, R] in fp32."""
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=response_len + 1,
    ).logits[:, :-1].float()
    targets = sequences[:, -response_len:]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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

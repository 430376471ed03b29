"""A rollout batch as padded tensors: | pad… prompt | response …pad |, plus what PPO computed for it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, Optional, Sequence

import torch


@dataclass
class Rollout:
    """Prompts left-padded to P tokens, responses right-padded to R; per-token tensors are [B, R]."""

    sequences: torch.Tensor  # [B, P + R] token ids
    attention_mask: torch.Tensor  # [B, P + R]
    action_mask: torch.Tensor  # [B, R], true on response tokens
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    @property
    def response_len(self) -> int:
        return self.action_mask.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows at `index`, cropped to the longest response among them."""
        width = int(self.action_mask[index].sum(-1).max())
        cut = self.response_len - width
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif f.name in ("sequences", "attention_mask"):
                out[f.name] = value[index, : value.shape[1] - cut]
            else:
                out[f.name] = value[index, :width]
        return replace(self, **out)

    def minibatches(self, size: int, generator: torch.Generator) -> Iterator["Rollout"]:
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            yield self.select(order[start : start + size])


def make_rollout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Rollout:
    """Pack token lists; every response needs at least one token."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("a response has no tokens")
    P, R = max(map(len, prompts)), max(map(len, responses))
    B = len(prompts)
    sequences = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + R), dtype=torch.long)
    action = torch.zeros((B, R), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        sequences[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        sequences[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, P - len(p) : P + len(r)] = 1
        action[i, : len(r)] = True
    return Rollout(sequences, attention, action)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token despite left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

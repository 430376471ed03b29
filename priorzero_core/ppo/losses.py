"""PPO/GRPO maths on padded [B, R] response tensors: KL, token rewards, GAE, advantages, clipped losses."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def approx_kl(logp: torch.Tensor, ref_logp: torch.Tensor, k3: bool) -> torch.Tensor:
    """Per-token KL(policy‖ref) estimate: k1 = log π − log π_ref, or the non-negative k3 = e^{−k1} − 1 + k1."""
    log_ratio = logp - ref_logp
    if not k3:
        return log_ratio
    # In float64 with expm1: near a KL of zero, fp32's exp(-r) - 1 + r cancels to 0 or noise (r = 1e-5 gives
    # r²/2 = 5e-11 against an fp32 rounding error of 6e-8), and early in training the KL is that small.
    r = log_ratio.double()
    return (torch.expm1(-r) + r).to(log_ratio.dtype)


def token_rewards(reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The scalar reward on each response's last token, minus `kl_coef`·KL on every token (ORZ's compute_reward)."""
    out = -kl_coef * kl * mask
    last = mask.shape[1] - 1 - mask.long().fliplr().argmax(dim=1)
    out[torch.arange(len(reward)), last] += reward.to(out.dtype)
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros_like(running)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages * mask, (advantages + values) * mask


def normalise(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten over every response token of the rollout batch."""
    mean = masked_mean(advantages, mask)
    var = masked_mean((advantages - mean) ** 2, mask)
    return (advantages - mean) * torch.rsqrt(var + eps) * mask


def group_advantages(reward: torch.Tensor, group_size: int, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each response's reward standardised within its prompt's group, given to all its tokens.

    Responses of one prompt are consecutive (`group_size` of them)."""
    groups = reward.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(groups)
    scaled = ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)
    return scaled[:, None] * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate (token mean); also returns the share of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return -masked_mean(surrogate, mask), masked_mean(clipped, mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss: the worse of the new value's and the clipped value's squared error."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)

"""UniZero-style world model: a causal transformer over interleaved (latent, action) tokens.

Observations and actions enter as text-encoder embeddings (see text_encoder.py for why actions are
text, not indices). The sequence [z_0, a_0, z_1, a_1, ...] is read through a window of the last
`context_length` pairs. At a latent token z_t the model predicts the value and a policy query; at an
action token a_t it predicts the next latent and the reward.

Search and training see the same windows: every window is laid out in the same 2·context_length
slots (the current pair last, missing history as masked padding on the left), so a value predicted
during training is exactly the one search would compute from that history. Training pays for this
with context_length times more tokens than one pass over the whole sequence; the windows are short
(≤ 2·context_length tokens). In search, each node keeps its window's keys and values: expanding a child
adds the action token to them (one row per layer) instead of re-running the window, which sits at the
same slots in both passes. The child's own window then shifts by a pair, so it is run in full.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import WorldModelConfig

MASKED_LOGIT = -1e9  # finite, so rows with no valid action stay NaN-free
VALID_AT_START = 3.0  # the validity head's initial logit for every action (p 0.95)
KV = tuple[Tensor, Tensor]  # one layer's attention keys and values [N, H, T, D/H]
H_EPS = 1e-3  # MuZero's h(x) = sign(x)(sqrt(|x|+1) - 1) + eps·x


def h_transform(x: Tensor) -> Tensor:
    return torch.sign(x) * (torch.sqrt(x.abs() + 1) - 1) + H_EPS * x


def h_inverse(y: Tensor) -> Tensor:
    return torch.sign(y) * (((torch.sqrt(1 + 4 * H_EPS * (y.abs() + 1 + H_EPS)) - 1) / (2 * H_EPS)) ** 2 - 1)


def scalar_to_support(x: Tensor, support_size: int) -> Tensor:
    """[...] scalars -> [..., 2S+1] two-hot distributions over the integers -S..S of h(x)."""
    y = h_transform(x).clamp(-support_size, support_size) + support_size
    low = y.floor()
    upper_weight = y - low
    probs = torch.zeros(*x.shape, 2 * support_size + 1, dtype=x.dtype, device=x.device)
    probs.scatter_(-1, low.long().unsqueeze(-1), (1 - upper_weight).unsqueeze(-1))
    high = (low + 1).clamp(max=2 * support_size).long().unsqueeze(-1)
    return probs.scatter_add_(-1, high, upper_weight.unsqueeze(-1))


def support_to_scalar(logits: Tensor, support_size: int) -> Tensor:
    """[..., 2S+1] logits -> [...] scalars: expected h(x) under softmax, mapped back through h⁻¹."""
    support = torch.arange(-support_size, support_size + 1, dtype=logits.dtype, device=logits.device)
    return h_inverse((logits.softmax(-1) * support).sum(-1))


class SelfAttention(nn.Module):
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.c_attn = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.c_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, keep: int, past: KV | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Outputs for the last `keep` of the T new positions [N, T, D] -> ([N, keep, D], keys, values).

        `past` holds the keys and values [N, H, P, D/H] of P earlier positions, which the new ones follow;
        the returned keys and values [N, H, P + T, D/H] cover all of them. mask is [N, 1, keep, P + T].
        """
        (N, T, D), H = x.shape, self.num_heads
        q, k, v = (t.view(N, T, H, D // H).transpose(1, 2) for t in self.c_attn(x).split(D, -1))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        q = q[:, :, -keep:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(N, keep, D))), k, v


class Block(nn.Module):
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.embed_dim, 4 * cfg.embed_dim),
            nn.GELU(),
            nn.Linear(4 * cfg.embed_dim, cfg.embed_dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor, mask: Tensor, keep: int, past: KV | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """[N, T, D] -> ([N, keep, D], keys, values): only the last `keep` rows are computed (the rest may never
        be read); the attention's keys and values cover `past` and all T rows."""
        attended, k, v = self.attn(self.ln_1(x), mask[:, :, -keep:], keep, past)
        x = x[:, -keep:] + attended
        return x + self.mlp(self.ln_2(x)), k, v


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))


class WMState(NamedTuple):
    """Per-node search state: the window ending at the newest latent, right-aligned, with its attention cache."""

    tokens: Tensor  # [B, 2C-1, D]
    length: Tensor  # [B] real tokens at the right end (odd: latents and the actions between them)
    keys: Tensor  # [B, layers, H, 2C-1, D/H] each block's attention keys over the window
    values: Tensor  # [B, layers, H, 2C-1, D/H]


@dataclass
class RootContext:
    """What search starts from, for B envs; history is right-aligned and zero-padded on the left."""

    past_obs: Tensor  # [B, C-1, E] observations before the current one
    past_act: Tensor  # [B, C-1, E] the action taken after each of them
    past_len: Tensor  # [B] real (obs, action) pairs in the history
    obs: Tensor  # [B, E] current observation
    valid_emb: Tensor  # [B, A, E] valid actions, padded
    valid_mask: Tensor  # [B, A] bool


@dataclass
class WMBatch:
    """A replay sample of B sequences: up to context_length − 1 steps of history, then unroll_steps + 1 sampled
    steps, L in all. History steps only fill the training windows, as the history of a search root does."""

    obs_emb: Tensor  # [B, L, E]
    act_emb: Tensor  # [B, L, E] executed actions
    valid_emb: Tensor  # [B, L, A, E]
    valid_mask: Tensor  # [B, L, A] bool
    rewards: Tensor  # [B, L] reward after a_t
    value_targets: Tensor  # [B, L] n-step returns
    policy_targets: Tensor  # [B, L, A] MCTS visit distributions
    step_mask: Tensor  # [B, L] bool: the sampled steps that get losses (False after the episode ended)
    known: Optional[Tensor] = None  # [B, L] bool: steps that exist, history included (None: step_mask)
    # [B, L, A] bool: the a-th valid action of step t − 1 is valid at step t too (False at t = 0): what the
    # validity head learns (world_model.validity_loss_weight); None: no validity loss
    carried_valid: Optional[Tensor] = None
    # Reanalysed targets (world_model.reanalyse): value_partial + bootstrap_discount x the target network's value
    # at position bootstrap_pos of the same row, where bootstrap_pos >= 0; value_targets elsewhere.
    value_partial: Optional[Tensor] = None  # [B, L]
    bootstrap_discount: Optional[Tensor] = None  # [B, L]
    bootstrap_pos: Optional[Tensor] = None  # [B, L] long, -1: keep value_targets

    def __post_init__(self) -> None:
        if self.known is None:
            self.known = self.step_mask

    def to(self, device: torch.device | str) -> "WMBatch":
        return WMBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                          for f in fields(self)})


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


class WorldModel(nn.Module):
    """Representation, dynamics, reward, value and policy as one transformer over (z, a) windows."""

    def __init__(self, cfg: WorldModelConfig, input_dim: int = 384):
        super().__init__()
        D, S, C = cfg.embed_dim, cfg.support_size, cfg.context_length
        self.cfg = cfg
        # Latents are LayerNorm'd without affine: zero-mean, unit-variance vectors keep the cosine
        # consistency loss informative (SimNorm's near-uniform start made every latent look alike).
        self.obs_proj = nn.Sequential(nn.Linear(input_dim, D), nn.LayerNorm(D, elementwise_affine=False))
        self.act_proj = nn.Sequential(nn.Linear(input_dim, D), nn.LayerNorm(D, elementwise_affine=False))
        self.type_emb = nn.Embedding(2, D)  # 0: latent, 1: action
        self.pos_emb = nn.Embedding(2 * C, D)  # slot in the window
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(D)
        self.value_head = _head(D, 2 * S + 1)
        self.policy_query = _head(D, D)
        self.policy_key = nn.Linear(input_dim, D, bias=False)
        self.dynamics_head = nn.Sequential(_head(D, D), nn.LayerNorm(D, elementwise_affine=False))
        self.reward_head = _head(D, 2 * S + 1)
        if cfg.validity_loss_weight > 0:  # validity_logits; absent otherwise, so older checkpoints load
            self.validity_query = _head(D, D)
            self.validity_key = nn.Linear(input_dim, D, bias=False)
            self.validity_bias = nn.Parameter(torch.tensor(VALID_AT_START))
        self.register_buffer("causal", torch.ones(2 * C, 2 * C, dtype=torch.bool).tril(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_layers))  # nanoGPT's residual scaling
        for embedding in (self.type_emb, self.pos_emb):  # the scale of the normalised latents and actions
            nn.init.normal_(embedding.weight, std=1.0)
        nn.init.normal_(self.policy_key.weight, std=1.0)  # unit-norm action embeddings -> unit-variance keys
        for head in (self.value_head, self.reward_head):  # start at a predicted 0, as MuZero does
            nn.init.zeros_(head[-1].weight)
        if self.has_validity:  # every action valid at the start: search drops none until the head has learned
            nn.init.normal_(self.validity_key.weight, std=1.0)
            nn.init.zeros_(self.validity_query[-1].weight)

    @property
    def has_validity(self) -> bool:
        return self.cfg.validity_loss_weight > 0

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def represent(self, obs_emb: Tensor) -> Tensor:
        """[..., E] observation embeddings -> [..., D] latents z."""
        return self.obs_proj(obs_emb)

    def latent_token(self, z: Tensor) -> Tensor:
        return z + self.type_emb.weight[0]

    def action_token(self, act_emb: Tensor) -> Tensor:
        return self.act_proj(act_emb) + self.type_emb.weight[1]

    def transformer(self, tokens: Tensor, length: Tensor, keep: int = 1) -> Tensor:
        """[N, T, D] right-aligned windows with `length` [N] real tokens -> hidden states of the last `keep`.

        The heads read only the newest token(s), so the last block computes only those rows.
        """
        return self._transformer(tokens, length, keep)[0]

    def _transformer(
        self, tokens: Tensor, length: Tensor, keep: int = 1, past: list[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        """transformer() that also returns each block's keys and values; with `past` (each block's cache of
        the P slots before them) the T tokens take slots P..P+T-1 of the window and `length` counts all P+T."""
        P = 0 if past is None else past[0][0].shape[2]
        T = P + tokens.shape[1]
        x = self.drop(tokens + self.pos_emb.weight[P:T])
        real = torch.arange(T, device=tokens.device) >= (T - length).unsqueeze(-1)  # [N, T]
        diagonal = torch.eye(T, dtype=torch.bool, device=tokens.device)[P:]  # padding attends to itself: no NaN
        mask = (self.causal[P:T, :T] & (real.unsqueeze(1) | diagonal)).unsqueeze(1)  # [N, 1, T - P, T]
        cache = []
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, k, v = block(x, mask, keep if last else T - P, None if past is None else past[i])
            cache.append((k, v))
        return self.ln_f(x), cache

    def _state(self, tokens: Tensor, length: Tensor) -> tuple[WMState, Tensor]:
        """Run a node's window -> (its state with the attention cache, hidden state of its newest latent [N, D])."""
        h, cache = self._transformer(tokens, length)
        keys, values = (torch.stack(kv, 1) for kv in zip(*cache))
        return WMState(tokens, length, keys, values), h[:, -1]

    def _action_scores(self, query_head: nn.Module, key: nn.Linear, h: Tensor, emb: Tensor) -> Tensor:
        """q·(W e_k)/sqrt(D) for each action k of `emb` [..., A, E], q = query_head(h), computed as (Wᵀq)·e_k
        so actions need no projection."""
        query = query_head(h) @ key.weight  # [..., E]
        # As a row vector times the transposed actions: on CPU this bmm is 2-9x faster than actions @ column.
        return (query.unsqueeze(-2) @ emb.transpose(-1, -2)).squeeze(-2) / math.sqrt(self.cfg.embed_dim)

    def policy_logits(self, h: Tensor, valid_emb: Tensor, valid_mask: Tensor) -> Tensor:
        """The policy's logit for each valid action (`_action_scores`), masked."""
        return self._action_scores(self.policy_query, self.policy_key, h, valid_emb).masked_fill(~valid_mask,
                                                                                                  MASKED_LOGIT)

    def validity_logits(self, h: Tensor, emb: Tensor) -> Tensor:
        """[..., D] hidden states and [..., A, E] action embeddings -> [..., A] logits that each action is valid
        in the state (`_action_scores` with the validity head's own weights, plus a bias)."""
        return self._action_scores(self.validity_query, self.validity_key, h, emb) + self.validity_bias

    def imagined_valid(self, h: Tensor, valid_emb: Tensor, valid_mask: Tensor) -> Tensor:
        """Of the root's valid actions, those the validity head keeps in imagined states `h` [N, D] -> [N, A]
        bool: p ≥ 0.5, and always the likeliest one."""
        logits = self.validity_logits(h, valid_emb).masked_fill(~valid_mask, MASKED_LOGIT)
        likeliest = F.one_hot(logits.argmax(-1), logits.shape[-1]).bool() & valid_mask
        return (valid_mask & (logits >= 0)) | likeliest

    def value(self, h: Tensor) -> Tensor:
        return support_to_scalar(self.value_head(h), self.cfg.support_size)

    @torch.inference_mode()
    def root_inference(self, ctx: RootContext) -> tuple[WMState, Tensor, Tensor]:
        """Search root for B envs -> (state, policy_logits [B, A], value [B])."""
        z = self.represent(torch.cat([ctx.past_obs, ctx.obs.unsqueeze(1)], 1))  # [B, C, D]
        pairs = torch.stack([self.latent_token(z[:, :-1]), self.action_token(ctx.past_act)], 2)
        tokens = torch.cat([pairs.flatten(1, 2), self.latent_token(z[:, -1:])], 1)  # [B, 2C-1, D]
        state, h = self._state(tokens, 2 * ctx.past_len + 1)
        return state, self.policy_logits(h, ctx.valid_emb, ctx.valid_mask), self.value(h)

    @torch.inference_mode()
    def recurrent_inference(
        self, state: tuple[Tensor, ...], action_idx: Tensor, valid_emb: Tensor, valid_mask: Tensor
    ) -> tuple[WMState, Tensor, Tensor, Tensor]:
        """Imagine action_idx [B] from state -> (next state, reward [B], policy_logits [B, A], value [B]).

        `state` is a WMState or its fields as the plain tuple search stores. Imagined states have no
        ground-truth valid actions, so every node of a tree scores the root's (`valid_emb`, `valid_mask`), less
        those the validity head rules out (`imagined_valid`, with world_model.validity_loss_weight > 0).
        """
        tokens, length, keys, values = state
        batch = torch.arange(tokens.shape[0], device=tokens.device)
        action = self.action_token(valid_emb[batch, action_idx]).unsqueeze(1)
        past = [(keys[:, i], values[:, i]) for i in range(keys.shape[1])]
        h = self._transformer(action, length + 1, past=past)[0][:, -1]  # the window's slots + the action's
        reward = support_to_scalar(self.reward_head(h), self.cfg.support_size)
        next_latent = self.latent_token(self.dynamics_head(h)).unsqueeze(1)
        window = tokens.shape[1]
        next_state, h = self._state(torch.cat([tokens, action, next_latent], 1)[:, -window:],
                                    (length + 2).clamp(max=window))
        if self.has_validity:
            valid_mask = self.imagined_valid(h, valid_emb, valid_mask)
        return next_state, reward, self.policy_logits(h, valid_emb, valid_mask), self.value(h)

    def search_fn(self, ctx: RootContext) -> Callable[..., tuple[WMState, Tensor, Tensor, Tensor]]:
        """recurrent_inference bound to the root's valid actions: the `recurrent_fn` for mcts.search."""
        return functools.partial(self.recurrent_inference, valid_emb=ctx.valid_emb, valid_mask=ctx.valid_mask)

    def _training_windows(self, z: Tensor, act_emb: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """For each step t of [B, L] sequences, the window of pairs t-C+1..t -> ([B·L, 2C, D], [B·L]); pairs
        before a sequence's `first` [B] known step are padding, as missing history is at a search root."""
        B, L, D = z.shape
        C = self.cfg.context_length
        pairs = torch.stack([self.latent_token(z), self.action_token(act_emb)], 2)  # [B, L, 2, D]
        index = torch.arange(L, device=z.device).unsqueeze(1) + torch.arange(1 - C, 1, device=z.device)  # [L, C]
        windows = pairs[:, index.clamp(min=0)].reshape(B * L, 2 * C, D)
        length = 2 * (index >= first.view(B, 1, 1)).sum(-1)  # [B, L]
        return windows, length.reshape(B * L)

    def forward(
        self, obs_emb: Tensor, act_emb: Tensor, valid_emb: Tensor, valid_mask: Tensor, first: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Teacher-forced [B, L] steps (known from `first` [B], default 0) -> value logits, policy logits [B, L, A],
        reward logits, next latents."""
        return self._teacher_forced(obs_emb, act_emb, valid_emb, valid_mask, first)[:4]

    def _teacher_forced(
        self, obs_emb: Tensor, act_emb: Tensor, valid_emb: Tensor, valid_mask: Tensor, first: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`forward`'s outputs and the hidden states of the latents [B, L, D]."""
        B, L, _ = obs_emb.shape
        if first is None:
            first = torch.zeros(B, dtype=torch.long, device=obs_emb.device)
        windows, length = self._training_windows(self.represent(obs_emb), act_emb, first)
        h = self.transformer(windows, length, keep=2).view(B, L, 2, -1)
        h_latent, h_action = h[:, :, -2], h[:, :, -1]
        return (
            self.value_head(h_latent),
            self.policy_logits(h_latent, valid_emb, valid_mask),
            self.reward_head(h_action),
            self.dynamics_head(h_action),
            h_latent,
        )

    def validity_loss(self, h_latent: Tensor, batch: WMBatch) -> tuple[Tensor, Tensor]:
        """Binary cross-entropy of the validity head over each sampled step's own valid actions (all valid) and
        the previous step's (valid as `batch.carried_valid` says) -> (loss, the share of the previous step's
        actions that are not valid any more which the head calls invalid)."""
        step = batch.step_mask
        own = self.validity_logits(h_latent, batch.valid_emb)
        own_mask = batch.valid_mask & step.unsqueeze(-1)
        carried = self.validity_logits(h_latent[:, 1:], batch.valid_emb[:, :-1])
        carried_mask = batch.valid_mask[:, :-1] & (batch.known[:, :-1] & step[:, 1:]).unsqueeze(-1)
        label = batch.carried_valid[:, 1:].to(carried.dtype)
        bce_own = F.binary_cross_entropy_with_logits(own, torch.ones_like(own), reduction="none")
        bce_carried = F.binary_cross_entropy_with_logits(carried, label, reduction="none")
        loss = (bce_own[own_mask].sum() + bce_carried[carried_mask].sum()) \
            / (own_mask.sum() + carried_mask.sum()).clamp(min=1)
        gone = carried_mask & ~batch.carried_valid[:, 1:]
        return loss, _masked_mean((carried < 0).to(carried.dtype), gone)

    @torch.no_grad()
    def reanalysed_targets(self, batch: WMBatch, target_model: "WorldModel", first: Tensor) -> Tensor:
        """The batch's value targets, bootstrapped from `target_model`'s value of the later step where the batch
        says so (MuZero Reanalyse: values of the current network instead of those stored at collection)."""
        if batch.bootstrap_pos is None:
            return batch.value_targets
        value = support_to_scalar(target_model(batch.obs_emb, batch.act_emb, batch.valid_emb, batch.valid_mask,
                                               first)[0], self.cfg.support_size)
        fresh = batch.value_partial + batch.bootstrap_discount * value.gather(1, batch.bootstrap_pos.clamp(min=0))
        return torch.where(batch.bootstrap_pos >= 0, fresh, batch.value_targets)

    def compute_loss(self, batch: WMBatch, target_model: "WorldModel") -> tuple[Tensor, dict[str, float]]:
        """Losses on real latents; the latent target is the EMA network's repr(obs_{t+1}), without gradient."""
        cfg, S, step = self.cfg, self.cfg.support_size, batch.step_mask
        first = batch.known.to(torch.int8).argmax(-1)  # known steps run from here to the episode's end
        value_logits, policy_logits, reward_logits, next_latent, h_latent = self._teacher_forced(
            batch.obs_emb, batch.act_emb, batch.valid_emb, batch.valid_mask, first
        )
        value_targets = self.reanalysed_targets(batch, target_model, first)
        value_ce = -(scalar_to_support(value_targets, S) * value_logits.log_softmax(-1)).sum(-1)
        reward_ce = -(scalar_to_support(batch.rewards, S) * reward_logits.log_softmax(-1)).sum(-1)
        log_policy = policy_logits.log_softmax(-1)
        policy_ce = -(batch.policy_targets * log_policy).sum(-1)
        entropy = -(log_policy.exp() * log_policy).sum(-1)

        with torch.no_grad():
            target = target_model.represent(batch.obs_emb[:, 1:])
        latent_loss = -F.cosine_similarity(next_latent[:, :-1], target, dim=-1)

        losses = {
            "reward": _masked_mean(reward_ce, step),
            "value": _masked_mean(value_ce, step),
            "policy": _masked_mean(policy_ce, step),
            "latent": _masked_mean(latent_loss, step[:, :-1] & batch.known[:, 1:]),
        }
        policy_entropy = _masked_mean(entropy, step)
        total = (
            cfg.reward_loss_weight * losses["reward"]
            + cfg.value_loss_weight * losses["value"]
            + cfg.policy_loss_weight * (losses["policy"] - cfg.policy_entropy_weight * policy_entropy)
            + cfg.latent_loss_weight * losses["latent"]
        )
        gone_caught = None
        if self.has_validity:
            if batch.carried_valid is None:
                raise ValueError("world_model.validity_loss_weight > 0 needs batches with carried_valid")
            losses["validity"], gone_caught = self.validity_loss(h_latent, batch)
            total = total + cfg.validity_loss_weight * losses["validity"]
        metrics = {f"train/wm_{name}_loss": float(v.detach()) for name, v in losses.items()}
        if gone_caught is not None:  # of the previous step's actions that are not valid any more: called invalid
            metrics["train/wm_validity_gone_caught"] = float(gone_caught)
        if batch.bootstrap_pos is not None:  # how far the fresh bootstraps moved the stored targets
            moved = step & (batch.bootstrap_pos >= 0)
            metrics["train/wm_reanalysed_share"] = float(_masked_mean(moved.float(), step))
            metrics["train/wm_reanalyse_shift"] = float(_masked_mean(value_targets - batch.value_targets, moved))
        metrics["train/wm_total_loss"] = float(total.detach())
        metrics["train/wm_policy_entropy"] = float(policy_entropy.detach())
        return total, metrics


@torch.no_grad()
def update_target(model: nn.Module, target: nn.Module, tau: float) -> None:
    """EMA step: target ← (1 − tau)·target + tau·model."""
    for p_target, p in zip(target.parameters(), model.parameters()):
        p_target.lerp_(p, tau)


class WorldModelLearner:
    """The world model, its EMA target network and AdamW; one `train_step` per replay batch."""

    def __init__(self, cfg: WorldModelConfig, input_dim: int = 384, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = WorldModel(cfg, input_dim).to(self.device)
        self.target = copy.deepcopy(self.model).requires_grad_(False)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]  # nanoGPT: no decay on biases and norms
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        self.steps = 0

    def train_step(self, batch: WMBatch) -> dict[str, float]:
        loss, metrics = self.model.compute_loss(batch.to(self.device), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        update_target(self.model, self.target, self.cfg.target_update_tau)
        self.steps += 1
        return metrics | {"train/wm_grad_norm": float(grad_norm)}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]

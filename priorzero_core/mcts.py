"""Batched MuZero search (PUCT) over a learned model, after mctx: small pure functions over one Tree.

All B trees advance together: each simulation walks down every tree in a Python loop over depth
(vectorised over the batch), makes ONE batched model call for the B new leaves, and backs the
values up. Nodes are rows of preallocated [B, N, ...] tensors (N = simulations + 1, node 0 the root);
the model's per-node state is a tuple of tensors stored the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import MCTSConfig

NodeState = tuple[Tensor, ...]  # each [B, ...]; the tree keeps each as [B, N, ...]
MASKED_LOGIT = -1e9
NO_CHILD = -1


class RecurrentFn(Protocol):
    """One batched model step: (states, actions [B]) -> (states, reward [B], prior_logits [B, A], value [B])."""

    def __call__(self, state: NodeState, action: Tensor) -> tuple[NodeState, Tensor, Tensor, Tensor]: ...


class RootOutput(NamedTuple):
    state: NodeState
    prior_logits: Tensor  # [B, A] (log-probs from root_prior, or raw model logits)
    value: Tensor  # [B]


@dataclass
class Tree:
    """B search trees of N preallocated nodes; children use the root's action set."""

    visit_count: Tensor  # [B, N]
    value_sum: Tensor  # [B, N] sum of backed-up values
    prior: Tensor  # [B, N, A] probabilities
    children: Tensor  # [B, N, A] node index, NO_CHILD if unexpanded
    parent: Tensor  # [B, N], NO_CHILD at the root
    action_from_parent: Tensor  # [B, N]
    reward: Tensor  # [B, N] predicted reward on the edge into the node
    depth: Tensor  # [B, N]
    state: NodeState  # each [B, N, ...]
    valid_mask: Tensor  # [B, A] the root's valid actions
    min_value: Tensor  # [B] bounds of the Q values seen, for min-max normalisation
    max_value: Tensor  # [B]
    node_offset: Tensor  # [B] b·N: env b's node n is row b·N + n of a flattened [B, N, ...] array

    def rows(self, x: Tensor, node: Tensor) -> Tensor:
        """x[b, node[b]] for every env b, from a [B, N, ...] node array."""
        return x.flatten(0, 1).index_select(0, node + self.node_offset)


class SearchOutput(NamedTuple):
    visit_counts: Tensor  # [B, A] root children
    visit_dist: Tensor  # [B, A]
    improved_policy: Tensor  # [B, A] softmax(prior logits + σ(completed Q)); visit_dist without a lookahead
    root_value: Tensor  # [B] mean backed-up value at the root
    q_values: Tensor  # [B, A] reward + discount·value of root children; 0 where unvisited
    selected_action: Tensor  # [B]
    tree: Tree


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    return logits.masked_fill(~mask, MASKED_LOGIT).softmax(-1)


def root_prior(
    wm_logits: Tensor,
    llm_logprior: Tensor | None,
    mask: Tensor,
    mode: Literal["wm", "llm", "mix"],
    mix_weight: float | Literal["adaptive"],
) -> Tensor:
    """Root log-probs [B, A] from the world model's logits and the LLM's log-prior (None: world model only).

    mix: p = w·softmax(wm) + (1 − w)·exp(llm); "adaptive" trusts the LLM more when the world model is
    sure of itself: w_llm = 0.3 + 0.4·(1 − H(p_wm)/log|A_valid|), w = 1 − w_llm.
    """
    p_wm = masked_softmax(wm_logits, mask)
    if llm_logprior is None or mode == "wm":
        p = p_wm
    elif mode == "llm":
        p = masked_softmax(llm_logprior, mask)
    else:
        if mix_weight == "adaptive":
            entropy = -(p_wm * p_wm.clamp(min=1e-12).log()).sum(-1, keepdim=True)
            max_entropy = mask.sum(-1, keepdim=True).to(p_wm.dtype).log().clamp(min=1e-12)
            w = 1 - (0.3 + 0.4 * (1 - entropy / max_entropy))
        else:
            w = mix_weight
        p = w * p_wm + (1 - w) * llm_logprior.exp().masked_fill(~mask, 0.0)
    return (p + 1e-8).log().masked_fill(~mask, MASKED_LOGIT)


def dirichlet_noise(
    prior: Tensor, mask: Tensor, alpha: float, weight: float, rng: np.random.Generator
) -> Tensor:
    """(1 − weight)·prior + weight·Dirichlet(alpha) drawn over each row's valid actions only."""
    gamma = torch.from_numpy(rng.gamma(alpha, size=tuple(prior.shape))).to(prior) * mask
    noise = gamma / gamma.sum(-1, keepdim=True).clamp(min=1e-12)
    return (1 - weight) * prior + weight * noise


def init_tree(root: RootOutput, valid_mask: Tensor, num_simulations: int, prior: Tensor) -> Tree:
    """A tree per env holding only its root, counted as visited once with the model's value (as mctx does)."""
    B, A = valid_mask.shape
    N = num_simulations + 1
    device = valid_mask.device
    value = root.value.float()
    tree = Tree(
        visit_count=torch.zeros(B, N, device=device),
        value_sum=torch.zeros(B, N, device=device),
        prior=torch.zeros(B, N, A, device=device),
        children=torch.full((B, N, A), NO_CHILD, dtype=torch.long, device=device),
        parent=torch.full((B, N), NO_CHILD, dtype=torch.long, device=device),
        action_from_parent=torch.full((B, N), NO_CHILD, dtype=torch.long, device=device),
        reward=torch.zeros(B, N, device=device),
        depth=torch.zeros(B, N, dtype=torch.long, device=device),
        state=tuple(s.new_zeros((B, N) + tuple(s.shape[1:])) for s in root.state),
        valid_mask=valid_mask,
        min_value=torch.full((B,), math.inf, device=device),
        max_value=torch.full((B,), -math.inf, device=device),
        node_offset=torch.arange(B, device=device) * N,
    )
    tree.visit_count[:, 0] = 1
    tree.value_sum[:, 0] = value
    tree.prior[:, 0] = prior
    for buf, s in zip(tree.state, root.state):
        buf[:, 0] = s
    return tree


def normalize(q: Tensor, tree: Tree) -> Tensor:
    """Min-max normalise [B, A] Q values with each tree's own bounds (unchanged until bounds differ)."""
    low, high = tree.min_value.unsqueeze(-1), tree.max_value.unsqueeze(-1)
    return torch.where(high > low, (q - low) / (high - low), q)


def child_stats(tree: Tree, node: Tensor, discount: float) -> tuple[Tensor, Tensor, Tensor]:
    """Children of `node` [B] -> [B, A] ids (or NO_CHILD), visit counts, Q = r + discount·V (0 if unvisited)."""
    children = tree.rows(tree.children, node)
    index = children.clamp(min=0)
    visits = tree.visit_count.gather(1, index) * (children != NO_CHILD)
    value = tree.value_sum.gather(1, index) / visits.clamp(min=1)
    q = (tree.reward.gather(1, index) + discount * value) * (visits > 0)
    return children, visits, q


def puct_action(tree: Tree, node: Tensor, cfg: MCTSConfig, discount: float) -> tuple[Tensor, Tensor]:
    """MuZero's PUCT choice at `node` [B] -> (action [B], the child it leads to or NO_CHILD)."""
    children, child_visits, q = child_stats(tree, node, discount)
    value_score = normalize(q, tree) * (child_visits > 0)  # unvisited children score 0
    parent_visits = tree.rows(tree.visit_count, node).unsqueeze(-1)
    pb_c = torch.log((parent_visits + cfg.pb_c_base + 1) / cfg.pb_c_base) + cfg.pb_c_init
    prior_score = pb_c * parent_visits.sqrt() / (child_visits + 1) * tree.rows(tree.prior, node)
    action = (prior_score + value_score).masked_fill(~tree.valid_mask, -math.inf).argmax(-1)
    return action, children.gather(1, action.unsqueeze(-1)).squeeze(-1)


def simulate(tree: Tree, cfg: MCTSConfig, discount: float) -> tuple[Tensor, Tensor]:
    """Walk every tree down by PUCT to an unexpanded edge -> (its node [B], action [B])."""
    node = torch.zeros_like(tree.node_offset)
    action, child = puct_action(tree, node, cfg, discount)
    while True:
        descend = child != NO_CHILD
        if not descend.any():  # one host sync per level
            return node, action
        node = torch.where(descend, child, node)
        next_action, next_child = puct_action(tree, node, cfg, discount)
        action = torch.where(descend, next_action, action)
        child = next_child.masked_fill(~descend, NO_CHILD)


def expand(
    tree: Tree, recurrent_fn: RecurrentFn, new_node: int, parent: Tensor, action: Tensor
) -> Tensor:
    """One batched model call for the B new leaves; stores them as node `new_node` -> leaf value [B]."""
    next_state, reward, logits, value = recurrent_fn(tuple(tree.rows(buf, parent) for buf in tree.state), action)
    tree.children.flatten(0, 1)[parent + tree.node_offset, action] = new_node
    tree.parent[:, new_node] = parent
    tree.action_from_parent[:, new_node] = action
    tree.reward[:, new_node] = reward.float()
    tree.depth[:, new_node] = tree.rows(tree.depth, parent) + 1
    tree.prior[:, new_node] = masked_softmax(logits.float(), tree.valid_mask)
    for buf, s in zip(tree.state, next_state):
        buf[:, new_node] = s
    return value.float()


def backup(tree: Tree, leaf: int, value: Tensor, discount: float) -> None:
    """Add the discounted return to every node from `leaf` to the root and widen the min-max bounds."""
    node = torch.full_like(tree.node_offset, leaf)
    value_sum, visit_count = tree.value_sum.view(-1), tree.visit_count.view(-1)
    for _ in range(int(tree.depth[:, leaf].max()) + 1):  # one host sync
        on_path = node != NO_CHILD  # envs whose path was shorter have passed the root
        flat = node.clamp(min=0) + tree.node_offset
        value_sum.index_add_(0, flat, value * on_path)
        visit_count.index_add_(0, flat, on_path.float())
        reward = tree.reward.view(-1)[flat]
        q = reward + discount * value_sum[flat] / visit_count[flat]
        tree.min_value = torch.minimum(tree.min_value, q.masked_fill(~on_path, math.inf))
        tree.max_value = torch.maximum(tree.max_value, q.masked_fill(~on_path, -math.inf))
        value = reward + discount * value
        node = tree.parent.view(-1)[flat]  # the root's parent is NO_CHILD, and so stays every passed env


def one_step_q(lookahead_fn: RecurrentFn, state: NodeState, valid_mask: Tensor, discount: float) -> Tensor:
    """r + discount·v for every root action [B, A] in one model call over B·A rows (`lookahead_fn` takes them)."""
    B, A = valid_mask.shape
    wide = tuple(s.repeat_interleave(A, 0) for s in state)
    actions = torch.arange(A, device=valid_mask.device).repeat(B)
    _, reward, _, value = lookahead_fn(wide, actions)
    return (reward.float() + discount * value.float()).view(B, A)


def improved_policy(prior_logits: Tensor, q: Tensor, visits: Tensor, mask: Tensor, c_visit: float, c_scale: float) -> Tensor:
    """Gumbel MuZero's policy improvement: softmax(logits + (c_visit + max N)·c_scale·q̂), q̂ min-max scaled over valid actions.

    Unlike visit counts, it moves towards better Q even when a handful of simulations visit only a few actions,
    which is what keeps low-simulation training (debug: 5) from collapsing onto the prior's favourite.
    """
    low = q.masked_fill(~mask, math.inf).min(-1, keepdim=True).values
    high = q.masked_fill(~mask, -math.inf).max(-1, keepdim=True).values
    q_hat = torch.where(high > low, (q - low) / (high - low).clamp(min=1e-8), torch.zeros_like(q))
    sigma = (c_visit + visits.max(-1, keepdim=True).values) * c_scale * q_hat
    return masked_softmax(prior_logits.float() + sigma, mask)


def select_action(visit_counts: Tensor, temperature: float, rng: np.random.Generator) -> Tensor:
    """[B] actions: argmax at temperature 0, else sampled with probability ∝ N^(1/T)."""
    if temperature == 0:
        return visit_counts.argmax(-1)
    cdf = (visit_counts.double().log() / temperature).softmax(-1).cumsum(-1).cpu().numpy()
    u = rng.random((cdf.shape[0], 1)) * cdf[:, -1:]
    return torch.from_numpy((cdf <= u).sum(-1)).to(visit_counts.device)  # first action whose cdf exceeds u


@torch.inference_mode()
def search(
    recurrent_fn: RecurrentFn,
    root: RootOutput,
    valid_mask: Tensor,
    cfg: MCTSConfig,
    rng: np.random.Generator,
    add_noise: bool,
    *,
    discount: float,
    temperature: float | None = None,
    lookahead_fn: RecurrentFn | None = None,
) -> SearchOutput:
    """cfg.num_simulations batched simulations from B roots; acts at `temperature` (default: collect).

    With `lookahead_fn` (the model over B·A rows) every root action also gets a one-step Q, which
    completes the Q values of unvisited actions for `improved_policy`; with cfg.policy_target
    "improved" the action is drawn from that policy instead of the visit counts.
    """
    prior = masked_softmax(root.prior_logits.float(), valid_mask)
    if add_noise:
        prior = dirichlet_noise(prior, valid_mask, cfg.root_dirichlet_alpha, cfg.root_noise_weight, rng)
    tree = init_tree(root, valid_mask, cfg.num_simulations, prior)
    for sim in range(cfg.num_simulations):
        parent, action = simulate(tree, cfg, discount)
        leaf_value = expand(tree, recurrent_fn, sim + 1, parent, action)
        backup(tree, sim + 1, leaf_value, discount)

    _, visit_counts, q_values = child_stats(tree, torch.zeros_like(tree.node_offset), discount)
    temperature = cfg.collect_temperature if temperature is None else temperature
    visit_dist = visit_counts / visit_counts.sum(-1, keepdim=True)
    improved = visit_dist
    if lookahead_fn is not None:
        completed = torch.where(visit_counts > 0, q_values, one_step_q(lookahead_fn, root.state, valid_mask, discount))
        improved = improved_policy(root.prior_logits, completed, visit_counts, valid_mask, cfg.c_visit, cfg.c_scale)
    act_from = improved if cfg.policy_target == "improved" else visit_counts
    return SearchOutput(
        visit_counts=visit_counts,
        visit_dist=visit_dist,
        improved_policy=improved,
        root_value=tree.value_sum[:, 0] / tree.visit_count[:, 0],
        q_values=q_values,
        selected_action=select_action(act_from, temperature, rng),
        tree=tree,
    )

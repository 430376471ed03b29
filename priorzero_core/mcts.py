"""Batched MuZero search (PUCT) over a learned model, after mctx: small pure functions over one Tree.

All B trees advance together: each simulation walks down every tree in a Python loop over depth
(vectorised over the batch), makes ONE batched model call for the B new leaves, and backs the values
up along the whole path at once. The tree statistics are numpy rows on the host (a numpy op costs a
fraction of a torch op's dispatch); the model's per-node state stays a tuple of tensors on the model's
device. Each row keeps its current PUCT choice, which backup recomputes for the rows whose statistics
changed (and for a whole tree when its Q bounds move), so a level of the walk is two lookups.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import MCTSConfig

NodeState = tuple[Tensor, ...]  # each [B, ...]; the tree keeps each as [B·N, ...]
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
    """B search trees of N nodes as rows of numpy arrays: env b's node n is row b·N + n.

    The extra last row, `empty`, is a blank node: a walk that leaves its tree lands there and stays
    (its scores are all 0 and it has no children), so all B walks go on without per-env branching.
    Edge statistics are kept on the parent's row, one column per action, so PUCT reads one row.
    """

    visit_count: np.ndarray  # [R] R = B·N + 1
    value_sum: np.ndarray  # [R] sum of backed-up values
    reward: np.ndarray  # [R] predicted reward on the edge into the node
    prior: np.ndarray  # [R, A] probabilities
    children: np.ndarray  # [R, A] child's row, `empty` if unexpanded
    child_visits: np.ndarray  # [R, A]
    child_q: np.ndarray  # [R, A] reward + discount·value of visited children, 0 otherwise
    explore: np.ndarray  # [R, A] PUCT's prior term c(N)·√N·P/(1 + n); -inf on invalid actions
    best: np.ndarray  # [R] PUCT's choice at each row under its tree's current Q bounds
    parent: np.ndarray  # [R] node index, NO_CHILD at the root
    action_from_parent: np.ndarray  # [R]
    depth: np.ndarray  # [R]
    state: NodeState  # each [B·N, ...] on the model's device
    valid_mask: np.ndarray  # [B, A] the root's valid actions, which children share
    min_value: np.ndarray  # [B] bounds of the Q values seen, for min-max normalisation
    max_value: np.ndarray  # [B]
    root: np.ndarray  # [B] row of each root, b·N
    num_nodes: int  # N
    empty: int  # the blank row, B·N
    returns: np.ndarray  # [N + 1, N + 1] discounted_sums for backup
    expanded: int = 1  # nodes in each tree so far (every simulation adds one to each)


class SearchedTree(NamedTuple):
    """The finished trees as [B, N, ...] tensors (sharing the search's memory), for inspection."""

    visit_count: Tensor
    value_sum: Tensor
    prior: Tensor
    children: Tensor
    parent: Tensor
    action_from_parent: Tensor
    reward: Tensor
    depth: Tensor


class SearchOutput(NamedTuple):
    visit_counts: Tensor  # [B, A] root children
    visit_dist: Tensor  # [B, A]
    improved_policy: Tensor  # [B, A] softmax(prior logits + σ(completed Q)); visit_dist without a lookahead
    root_value: Tensor  # [B] mean backed-up value at the root (mcts.root_value "lookahead": expected one-step Q)
    q_values: Tensor  # [B, A] reward + discount·value of root children; 0 where unvisited
    selected_action: Tensor  # [B]
    tree: SearchedTree
    completed_q: Tensor  # [B, A] q_values, completed where unvisited as the improved policy completes them


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


def init_tree(
    root: RootOutput, valid_mask: Tensor, num_simulations: int, prior: Tensor, cfg: MCTSConfig, discount: float
) -> Tree:
    """A tree per env holding only its root, counted as visited once with the model's value (as mctx does)."""
    B, A = valid_mask.shape
    N = num_simulations + 1
    R = B * N + 1
    empty = B * N
    tree = Tree(
        visit_count=np.zeros(R),
        value_sum=np.zeros(R),
        reward=np.zeros(R),
        prior=np.zeros((R, A)),
        children=np.full((R, A), empty),
        child_visits=np.zeros((R, A)),
        child_q=np.zeros((R, A)),
        explore=np.zeros((R, A)),
        best=np.zeros(R, dtype=np.int64),
        parent=np.full(R, NO_CHILD),
        action_from_parent=np.full(R, NO_CHILD),
        depth=np.zeros(R, dtype=np.int64),
        state=tuple(s.new_empty((B * N,) + tuple(s.shape[1:])) for s in root.state),  # rows are written before read
        valid_mask=valid_mask.cpu().numpy(),
        min_value=np.full(B, math.inf),
        max_value=np.full(B, -math.inf),
        root=np.arange(B) * N,
        num_nodes=N,
        empty=empty,
        returns=discounted_sums(N + 1, discount),
    )
    tree.visit_count[tree.root] = 1
    tree.value_sum[tree.root] = root.value.float().cpu().numpy()
    tree.prior[tree.root] = prior.cpu().numpy()
    rows = torch.from_numpy(tree.root).to(valid_mask.device)
    for buf, s in zip(tree.state, root.state):
        buf.index_copy_(0, rows, s)
    refresh_explore(tree, tree.root, cfg)
    refresh_best(tree, tree.root)
    return tree


def refresh_explore(tree: Tree, rows: np.ndarray, cfg: MCTSConfig) -> None:
    """Recompute PUCT's prior term on `rows` [M], whose visit counts changed."""
    parent_visits = tree.visit_count[rows][:, None]
    pb_c = np.log((parent_visits + cfg.pb_c_base + 1) / cfg.pb_c_base) + cfg.pb_c_init
    term = pb_c * np.sqrt(parent_visits) * tree.prior[rows] / (tree.child_visits[rows] + 1)
    tree.explore[rows] = np.where(tree.valid_mask[rows // tree.num_nodes], term, -math.inf)


def q_bounds(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """(low, scale) [B, 1] that min-max normalise Q as (q − low)·scale; identity until a tree's bounds differ."""
    spread = tree.max_value > tree.min_value
    low = np.where(spread, tree.min_value, 0.0)
    scale = 1 / np.where(spread, tree.max_value - tree.min_value, 1.0)
    return low[:, None], scale[:, None]


def refresh_best(tree: Tree, rows: np.ndarray) -> None:
    """MuZero's PUCT choice at `rows` [M], whose statistics or Q bounds changed: prior term + min-max
    normalised Q of visited children (unvisited: 0)."""
    low, scale = q_bounds(tree)
    env = rows // tree.num_nodes
    visited = tree.child_visits[rows] > 0
    value_score = np.where(visited, (tree.child_q[rows] - low[env]) * scale[env], 0.0)
    tree.best[rows] = (tree.explore[rows] + value_score).argmax(-1)


def simulate(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """Walk every tree down by PUCT to an unexpanded edge -> the rows walked [B, L] (`empty` after a walk's
    end) and the actions taken from them [B, L]; each walk's last real row and action are the edge to expand.

    Each row's choice is kept up to date by `backup`, so a level of the walk is two lookups."""
    rows = tree.root
    path, actions = [], []
    while True:
        action = tree.best[rows]
        path.append(rows)
        actions.append(action)
        rows = tree.children[rows, action]
        if (rows == tree.empty).all():
            return np.stack(path, 1), np.stack(actions, 1)


def expand(
    tree: Tree, recurrent_fn: RecurrentFn, leaf: np.ndarray, parent: np.ndarray, action: np.ndarray, valid_mask: Tensor
) -> np.ndarray:
    """One batched model call for the B new leaves; stores them at rows `leaf` [B] -> leaf value [B]."""
    device = valid_mask.device
    parent_rows = torch.from_numpy(parent).to(device)
    next_state, reward, logits, value = recurrent_fn(
        tuple(buf.index_select(0, parent_rows) for buf in tree.state), torch.from_numpy(action).to(device))
    tree.children[parent, action] = leaf
    tree.expanded += 1
    tree.parent[leaf] = parent - tree.root
    tree.action_from_parent[leaf] = action
    tree.reward[leaf] = reward.float().cpu().numpy()
    tree.depth[leaf] = tree.depth[parent] + 1
    tree.prior[leaf] = masked_softmax(logits.float(), valid_mask).cpu().numpy()
    leaf_rows = torch.from_numpy(leaf).to(device)
    for buf, s in zip(tree.state, next_state):
        buf.index_copy_(0, leaf_rows, s)
    return value.float().cpu().numpy()


def discounted_sums(length: int, discount: float) -> np.ndarray:
    """[L, L] matrix whose row j sums rewards after position j: discount^(i−j−1) at column i > j, else 0."""
    i, j = np.arange(length)[None, :], np.arange(length)[:, None]
    return np.where(i > j, discount ** np.maximum(i - j - 1, 0), 0.0)


def backup(tree: Tree, path: np.ndarray, actions: np.ndarray, value: np.ndarray, discount: float,
           cfg: MCTSConfig) -> None:
    """Add each node's discounted return along `path` [B, L + 1] (root … new leaf, then `empty`), all depths at
    once; update the edges walked (`actions` [B, L]), the PUCT prior terms and the min-max bounds."""
    on = path != tree.empty
    leaf_at = on.sum(1, keepdims=True) - 1
    # return at position j: Σ_{i>j} discount^(i−j−1)·r_i + discount^(leaf−j)·v
    length = path.shape[1]
    returns = (tree.reward[path] * on) @ tree.returns[:length, :length].T
    returns += discount ** np.maximum(leaf_at - np.arange(length), 0) * value[:, None]
    rows = path[on]  # distinct: a walk never revisits a node
    tree.value_sum[rows] += returns[on]
    tree.visit_count[rows] += 1
    q = np.zeros(path.shape)
    q[on] = tree.reward[rows] + discount * tree.value_sum[rows] / tree.visit_count[rows]
    low = np.minimum(tree.min_value, np.min(q, 1, where=on, initial=math.inf))
    high = np.maximum(tree.max_value, np.max(q, 1, where=on, initial=-math.inf))
    rescaled = np.flatnonzero((low != tree.min_value) | (high != tree.max_value))  # trees whose Q bounds moved
    tree.min_value, tree.max_value = low, high
    edge = on[:, 1:]
    parents, taken = path[:, :-1][edge], actions[edge]
    tree.child_visits[parents, taken] += 1
    tree.child_q[parents, taken] = q[:, 1:][edge]
    refresh_explore(tree, rows, cfg)
    if len(rescaled):  # every node of those trees compares normalised Qs anew (a row twice does no harm)
        rows = np.concatenate([rows, (tree.root[rescaled, None] + np.arange(tree.expanded)).ravel()])
    refresh_best(tree, rows)


def searched_tree(tree: Tree, device: torch.device) -> SearchedTree:
    """The trees as [B, N, ...] tensors on `device`."""
    B, N = len(tree.root), tree.num_nodes
    node_of_row = np.append(np.arange(B * N) % N, NO_CHILD)
    children = node_of_row[tree.children]
    view = lambda x: torch.from_numpy(x[: B * N].reshape(B, N, *x.shape[1:])).to(device)  # noqa: E731
    return SearchedTree(
        visit_count=view(tree.visit_count).float(), value_sum=view(tree.value_sum).float(),
        prior=view(tree.prior).float(), children=view(children), parent=view(tree.parent),
        action_from_parent=view(tree.action_from_parent), reward=view(tree.reward).float(), depth=view(tree.depth))


def one_step_q(lookahead_fn: RecurrentFn, state: NodeState, valid_mask: Tensor, discount: float) -> Tensor:
    """r + discount·v for every root action [B, A] in one model call over B·A rows (`lookahead_fn` takes them)."""
    B, A = valid_mask.shape
    wide = tuple(s.repeat_interleave(A, 0) for s in state)
    actions = torch.arange(A, device=valid_mask.device).repeat(B)
    _, reward, _, value = lookahead_fn(wide, actions)
    return (reward.float() + discount * value.float()).view(B, A)


def mixed_value(value: Tensor, q: Tensor, visits: Tensor, prior: Tensor) -> Tensor:
    """Gumbel MuZero's v_mix [B, 1]: the root's value estimate `value` [B] mixed with the prior-weighted mean Q of
    the visited actions, by the number of visits (mctx's `_compute_mixed_value`)."""
    total = visits.sum(-1)
    seen = visits > 0
    weights = torch.where(seen, prior.clamp(min=torch.finfo(prior.dtype).tiny), torch.zeros_like(prior))
    weighted_q = (weights * torch.where(seen, q, torch.zeros_like(q))).sum(-1) / weights.sum(-1).clamp(min=1e-12)
    return ((value + total * weighted_q) / (total + 1)).unsqueeze(-1)


def improved_policy(prior_logits: Tensor, q: Tensor, visits: Tensor, mask: Tensor, c_visit: float, c_scale: float,
                    min_spread: float = 0.0) -> Tensor:
    """Gumbel MuZero's policy improvement: softmax(logits + (c_visit + max N)·c_scale·q̂), q̂ min-max scaled over valid
    actions, dividing by no less than `min_spread` (mcts.min_q_spread).

    Unlike visit counts, it moves towards better Q even when a handful of simulations visit only a few actions,
    which is what keeps low-simulation training (debug: 5) from collapsing onto the prior's favourite.
    """
    low = q.masked_fill(~mask, math.inf).min(-1, keepdim=True).values
    high = q.masked_fill(~mask, -math.inf).max(-1, keepdim=True).values
    spread = (high - low).clamp(min=max(min_spread, 1e-8))
    q_hat = torch.where(high > low, (q - low) / spread, torch.zeros_like(q))
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
@functools.cache
def _compiled():
    """The numba kernels (compiled, or loaded from numba's cache, on first use)."""
    from . import mcts_compiled

    return mcts_compiled


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
    tree = init_tree(root, valid_mask, cfg.num_simulations, prior, cfg, discount)
    envs = np.arange(len(tree.root))
    kernels = _compiled() if cfg.compiled else None
    for sim in range(1, cfg.num_simulations + 1):
        if kernels is not None:
            path, actions = kernels.simulate(tree.best, tree.children, tree.root, tree.empty)
        else:
            path, actions = simulate(tree)
        last = (path != tree.empty).sum(1) - 1
        leaf = tree.root + sim
        leaf_value = expand(tree, recurrent_fn, leaf, path[envs, last], actions[envs, last], valid_mask)
        path = np.concatenate([path, np.full((len(envs), 1), tree.empty)], 1)
        path[envs, last + 1] = leaf
        if kernels is not None:
            kernels.backup(path, actions, leaf_value, discount, tree.reward, tree.returns, tree.value_sum,
                           tree.visit_count, tree.min_value, tree.max_value, tree.child_visits, tree.child_q,
                           tree.explore, tree.best, tree.prior, tree.valid_mask, tree.root, tree.num_nodes,
                           tree.expanded, tree.empty, cfg.pb_c_base, cfg.pb_c_init)
        else:
            backup(tree, path, actions, leaf_value, discount, cfg)

    device = valid_mask.device
    visit_counts = torch.from_numpy(tree.child_visits[tree.root]).float().to(device)
    q_values = torch.from_numpy(tree.child_q[tree.root]).float().to(device)
    root_value = torch.from_numpy(tree.value_sum[tree.root] / tree.visit_count[tree.root]).float().to(device)
    temperature = cfg.collect_temperature if temperature is None else temperature
    visit_dist = visit_counts / visit_counts.sum(-1, keepdim=True)
    improved, completed = visit_dist, q_values
    if lookahead_fn is not None:
        one_step = (one_step_q(lookahead_fn, root.state, valid_mask, discount)
                    if cfg.complete_q == "one_step" or cfg.root_value == "lookahead" else None)
        unvisited = (mixed_value(root.value.float(), q_values, visit_counts, masked_softmax(root.prior_logits.float(),
                                                                                           valid_mask))
                     if cfg.complete_q == "mixed_value" else one_step)
        completed = torch.where(visit_counts > 0, q_values, unvisited)
        improved = improved_policy(root.prior_logits, completed, visit_counts, valid_mask, cfg.c_visit, cfg.c_scale,
                                   cfg.min_q_spread)
        if cfg.root_value == "lookahead":  # the improved policy's expected one-step Q (mcts.root_value)
            root_value = (improved * torch.where(valid_mask, one_step, torch.zeros_like(one_step))).sum(-1)
    elif cfg.root_value == "lookahead":
        raise ValueError("mcts.root_value 'lookahead' needs the one-step Q of every root action (a lookahead_fn)")
    act_from = improved if cfg.policy_target == "improved" else visit_counts
    return SearchOutput(
        visit_counts=visit_counts,
        visit_dist=visit_dist,
        improved_policy=improved,
        root_value=root_value,
        q_values=q_values,
        selected_action=select_action(act_from, temperature, rng),
        tree=searched_tree(tree, device),
        completed_q=completed,
    )

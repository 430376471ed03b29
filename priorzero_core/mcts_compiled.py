"""The search tree's walk and backup compiled with numba (`mcts.compiled`, on by default).

The same computations as `mcts.simulate` and `mcts.backup` (the numpy path, kept for `mcts.compiled: false`),
as loops over the trees' rows instead of a dozen numpy calls a level: a simulation's tree work drops from
a few hundred microseconds of numpy dispatch to a few microseconds. `cache=True` writes the machine code beside
this file (or under $NUMBA_CACHE_DIR) on first use, so a machine compiles once, not every run.

Sums run in the same order as the numpy path wherever that path sums elementwise; the returns along a path,
which numpy takes as a matrix product, are summed left to right here, so values may differ from the numpy path's
in the last bits (visit counts agree: tests/test_mcts.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True)
def simulate(best: np.ndarray, children: np.ndarray, root: np.ndarray, empty: int) -> tuple[np.ndarray, np.ndarray]:
    """`mcts.simulate` on the tree's arrays: rows walked [B, L] (`empty` after a walk's end) and actions [B, L]."""
    B = root.shape[0]
    lengths = np.empty(B, np.int64)
    longest = 0
    for b in range(B):
        row, n = root[b], 0
        while True:
            n += 1
            row = children[row, best[row]]
            if row == empty:
                break
        lengths[b] = n
        longest = max(longest, n)
    path = np.full((B, longest), empty, np.int64)
    actions = np.full((B, longest), best[empty], np.int64)
    for b in range(B):
        row = root[b]
        for j in range(lengths[b]):
            a = best[row]
            path[b, j] = row
            actions[b, j] = a
            row = children[row, a]
    return path, actions


@njit(cache=True)
def _refresh_explore(row: int, visit_count, prior, child_visits, explore, valid_mask, num_nodes: int,
                     pb_c_base: float, pb_c_init: float) -> None:
    parent_visits = visit_count[row]
    pb_c = math.log((parent_visits + pb_c_base + 1) / pb_c_base) + pb_c_init
    root_sqrt = math.sqrt(parent_visits)
    env = row // num_nodes
    for a in range(prior.shape[1]):
        if valid_mask[env, a]:
            explore[row, a] = pb_c * root_sqrt * prior[row, a] / (child_visits[row, a] + 1)
        else:
            explore[row, a] = -math.inf


@njit(cache=True)
def _refresh_best(row: int, low: np.ndarray, scale: np.ndarray, child_visits, child_q, explore, best,
                  num_nodes: int) -> None:
    env = row // num_nodes
    choice, top = 0, -math.inf
    for a in range(explore.shape[1]):
        score = explore[row, a] + ((child_q[row, a] - low[env]) * scale[env] if child_visits[row, a] > 0 else 0.0)
        if score > top or a == 0:
            choice, top = a, score
    best[row] = choice


@njit(cache=True)
def backup(path: np.ndarray, actions: np.ndarray, value: np.ndarray, discount: float, reward, returns_matrix,
           value_sum, visit_count, min_value, max_value, child_visits, child_q, explore, best, prior, valid_mask,
           root: np.ndarray, num_nodes: int, expanded: int, empty: int, pb_c_base: float, pb_c_init: float) -> None:
    """`mcts.backup` on the tree's arrays, in place."""
    B, L = path.shape
    q = np.zeros((B, L))
    rescaled = np.zeros(B, np.bool_)
    for b in range(B):
        leaf_at = -1
        for j in range(L):
            if path[b, j] != empty:
                leaf_at += 1
        returns = np.zeros(L)
        for j in range(L):
            if path[b, j] == empty:
                continue
            total = 0.0
            for i in range(j + 1, L):
                if path[b, i] != empty:
                    total += reward[path[b, i]] * returns_matrix[j, i]
            returns[j] = total + discount ** max(leaf_at - j, 0) * value[b]
        low, high = min_value[b], max_value[b]
        for j in range(L):
            row = path[b, j]
            if row == empty:
                continue
            value_sum[row] += returns[j]
            visit_count[row] += 1
            q[b, j] = reward[row] + discount * value_sum[row] / visit_count[row]
            low = min(low, q[b, j])
            high = max(high, q[b, j])
        rescaled[b] = low != min_value[b] or high != max_value[b]
        min_value[b], max_value[b] = low, high
        for j in range(L - 1):
            if path[b, j + 1] != empty:
                parent, taken = path[b, j], actions[b, j]
                child_visits[parent, taken] += 1
                child_q[parent, taken] = q[b, j + 1]
        for j in range(L):
            if path[b, j] != empty:
                _refresh_explore(path[b, j], visit_count, prior, child_visits, explore, valid_mask, num_nodes,
                                 pb_c_base, pb_c_init)
    spread = max_value > min_value
    low_all = np.where(spread, min_value, 0.0)
    scale_all = 1 / np.where(spread, max_value - min_value, 1.0)
    for b in range(B):
        if rescaled[b]:  # every node of the tree compares normalised Qs anew
            for n in range(expanded):
                _refresh_best(root[b] + n, low_all, scale_all, child_visits, child_q, explore, best, num_nodes)
        else:
            for j in range(L):
                if path[b, j] != empty:
                    _refresh_best(path[b, j], low_all, scale_all, child_visits, child_q, explore, best, num_nodes)

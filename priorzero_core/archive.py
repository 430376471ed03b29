"""Go-Explore's archive: the shortest way found to each cell of a game, for collection to return to and explore from.

A cell is a coarse description of a state (`GameEnv.cell_key`: score and place, and for Jericho games what the
player carries and can do there). The archive keeps, per cell, the shortest trajectory from the game's start
that reached it and the env snapshot at its end. Collection episodes return to a chosen cell by restoring its
snapshot and explore from there with the agent's own search (Ecoffet et al. 2021; Madotto et al. 2020 for text
games); evaluation never restores. The best trajectory (highest score, then shortest; with seed replays, what it
holds on other game seeds one move past its end, `robust_best`) is what the learners imitate (`demo`), so the agent
learns to walk from the start to where exploration got, as XTX's exploitation phase does.

Trajectories share their prefixes: a `Trace` is a persistent list of the steps from the start.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np

from .checkpoint import gzip_text
from .config import ExploreConfig
from .errors import CheckpointError
from .replay import GameSegment, StepRecord

ARCHIVE_FILE = "archive.jsonl.gz"
T = TypeVar("T")  # a move, or its index in a trajectory (shorten)


@dataclass(frozen=True)
class Trace:
    """The steps from the game's start to a state: `step` last, the rest in `parent`."""

    parent: Optional["Trace"]
    step: StepRecord
    length: int

    @staticmethod
    def extend(parent: Optional["Trace"], step: StepRecord) -> "Trace":
        return Trace(parent, step, 1 + (parent.length if parent else 0))

    def steps(self) -> list[StepRecord]:
        out, node = [], self
        while node is not None:
            out.append(node.step)
            node = node.parent
        return out[::-1]


def trace_steps(trace: Optional[Trace]) -> list[StepRecord]:
    return trace.steps() if trace is not None else []


@dataclass
class Cell:
    key: str
    score: int
    trace: Optional[Trace]  # None: the start state
    state: Any  # GameEnv.get_state() at the trace's end
    times_chosen: int = 0
    times_seen: int = 0

    @property
    def length(self) -> int:
        return self.trace.length if self.trace is not None else 0


class Archive:
    """Cells keyed by `GameEnv.cell_key`, each with the shortest trajectory found to it."""

    def __init__(self, cfg: ExploreConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.rng = rng
        self.cells: dict[str, Cell] = {}
        self.updates = 0  # cells added or shortened, for metrics
        # What changed since `take_changes` (collection shards keep mirrors of the archive in step with it): cells
        # added or shortened, cells whose counts moved, and whether everything must be sent again (restored).
        self.changed: set[str] = set()
        self.counted: set[str] = set()
        self.replaced = True

    def __len__(self) -> int:
        return len(self.cells)

    def visit(self, key: str, score: int, trace: Optional[Trace], snapshot: Callable[[], Any]) -> bool:
        """A state of cell `key` was reached by `trace`. Keeps it (and takes its snapshot) when the cell is new or
        the trace is shorter than the cell's; returns whether it did."""
        cell = self.cells.get(key)
        length = trace.length if trace is not None else 0
        self.counted.add(key)
        if cell is not None:
            cell.times_seen += 1
            if length >= cell.length:
                return False
            cell.trace, cell.state = trace, snapshot()
        else:
            self.cells[key] = Cell(key, score, trace, snapshot(), times_seen=1)
        self.updates += 1
        self.changed.add(key)
        return True

    def take_changes(self) -> tuple[bool, set[str], set[str]]:
        """(everything replaced, keys added or shortened, keys whose counts moved) since the last call."""
        out = (self.replaced, self.changed, self.counted - self.changed)
        self.replaced, self.changed, self.counted = False, set(), set()
        return out

    def weights(self, cells: list[Cell]) -> np.ndarray:
        """Go-Explore's count-based selection weights: cells rarely chosen and rarely seen first."""
        return np.array([1 / math.sqrt(1 + c.times_chosen) + 1 / math.sqrt(1 + c.times_seen) for c in cells])

    def choose(self) -> Cell:
        """A cell to return to: with probability `frontier_share` among the cells at one of the best
        `frontier_levels` scores (the level drawn uniformly, so no level's number of cells decides its share),
        else among all, drawn by `weights`."""
        cells = list(self.cells.values())
        if self.rng.random() < self.cfg.frontier_share:
            levels = sorted({c.score for c in cells}, reverse=True)[: self.cfg.frontier_levels]
            level = levels[int(self.rng.integers(len(levels)))] if len(levels) > 1 else levels[0]
            cells = [c for c in cells if c.score == level]
        w = self.weights(cells)
        cell = cells[int(self.rng.choice(len(cells), p=w / w.sum()))]
        cell.times_chosen += 1
        self.counted.add(cell.key)
        return cell

    def best(self) -> Optional[Cell]:
        """The highest-scoring cell, the shortest way to it on ties."""
        if not self.cells:
            return None
        return max(self.cells.values(), key=lambda c: (c.score, -c.length))

    def candidates(self, limit: int) -> list[Cell]:
        """Up to `limit` cells from the best score down, shortest first within a score, at most a quarter of
        `limit` (and at least one) per score."""
        per_score = max(1, limit // 4)
        ranked = sorted(self.cells.values(), key=lambda c: (-c.score, c.length, c.key))
        out: list[Cell] = []
        taken: dict[int, int] = {}
        for cell in ranked:
            if len(out) >= limit:
                break
            if taken.get(cell.score, 0) < per_score:
                taken[cell.score] = taken.get(cell.score, 0) + 1
                out.append(cell)
        return out

    def metrics(self) -> dict[str, float]:
        best = self.best()
        return {
            "explore/cells": float(len(self.cells)),
            "explore/cell_updates": float(self.updates),
            "explore/best_score": float(best.score) if best else 0.0,
            "explore/best_length": float(best.length) if best else 0.0,
        }

    def snapshot(self) -> tuple[dict[str, Cell], int]:
        """The archive as it is now, in memory (cells copied; traces and env snapshots are never changed in place)."""
        return {k: replace(c) for k, c in self.cells.items()}, self.updates

    def restore(self, snapshot: tuple[dict[str, Cell], int]) -> None:
        cells, self.updates = snapshot
        self.cells = {k: replace(c) for k, c in cells.items()}
        self.replaced, self.changed, self.counted = True, set(), set()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path, to_bytes: Callable[[Any], bytes]) -> None:
        """One gzip JSON-lines file: a reference snapshot, the trace steps (each once, parents first), then the
        cells. Each cell's snapshot is compressed with the reference as zlib's preset dictionary: snapshots of one
        game differ in a few hundred bytes (a Zork 1 snapshot: 12 kB alone, ≈ 0.3 kB so)."""
        cells = list(self.cells.values())
        reference = to_bytes(cells[0].state) if cells else b""
        ids: dict[int, int] = {}  # id(Trace) -> its row number
        # Equal steps after the same row are one row, however many Trace objects hold them (a resumed run's
        # episodes rebuild theirs), so the file depends on the archive's content alone.
        rows: dict[tuple[Optional[int], bytes], int] = {}
        with gzip_text(Path(directory) / ARCHIVE_FILE) as fh:
            def node_id(trace: Optional[Trace]) -> Optional[int]:
                chain, node = [], trace
                while node is not None and id(node) not in ids:
                    chain.append(node)
                    node = node.parent
                for new in reversed(chain):
                    parent = ids[id(new.parent)] if new.parent is not None else None
                    step = json.dumps(asdict(new.step))
                    key = (parent, hashlib.blake2b(step.encode(), digest_size=16).digest())
                    if key not in rows:
                        rows[key] = len(rows)
                        fh.write(f'{{"node": {rows[key]}, "parent": {json.dumps(parent)}, "step": {step}}}\n')
                    ids[id(new)] = rows[key]
                return ids[id(trace)] if trace is not None else None

            fh.write(json.dumps({"reference": _b64(zlib.compress(reference, 1)), "updates": self.updates}) + "\n")
            for cell in cells:
                packer = zlib.compressobj(1, zdict=reference) if reference else zlib.compressobj(1)
                state = _b64(packer.compress(to_bytes(cell.state)) + packer.flush())
                fh.write(json.dumps({"cell": cell.key, "score": cell.score, "trace": node_id(cell.trace),
                                     "state": state, "chosen": cell.times_chosen, "seen": cell.times_seen}) + "\n")

    def load(self, directory: Path, from_bytes: Callable[[bytes], Any]) -> None:
        path = Path(directory) / ARCHIVE_FILE
        nodes: dict[int, Trace] = {}
        cells: dict[str, Cell] = {}
        reference = b""
        updates = 0
        try:
            with gzip.open(path, "rt") as fh:
                for line in fh:
                    row = json.loads(line)
                    if "reference" in row:
                        reference = zlib.decompress(base64.b64decode(row["reference"]))
                        updates = int(row.get("updates", 0))
                    elif "node" in row:
                        parent = nodes[row["parent"]] if row["parent"] is not None else None
                        nodes[row["node"]] = Trace.extend(parent, StepRecord(**row["step"]))
                    else:
                        trace = nodes[row["trace"]] if row["trace"] is not None else None
                        unpacker = zlib.decompressobj(zdict=reference) if reference else zlib.decompressobj()
                        packed = base64.b64decode(row["state"])
                        state = from_bytes(unpacker.decompress(packed) + unpacker.flush())
                        cells[row["cell"]] = Cell(row["cell"], int(row["score"]), trace, state,
                                                  int(row["chosen"]), int(row["seen"]))
        except (OSError, EOFError, ValueError, KeyError, TypeError, zlib.error) as err:
            raise CheckpointError(f"archive {path} is unreadable ({type(err).__name__}: {err})") from None
        self.cells, self.updates = cells, updates
        self.replaced, self.changed, self.counted = True, set(), set()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def without_loops(steps: list[StepRecord]) -> list[StepRecord]:
    """The steps with every detour that came back to a world state already passed through (same world hash, same
    score) cut out: from each state, go on from the last time the trajectory was in it. Exploration's random
    tries leave many such detours (open/close, west/east); what is left reaches the same states with the same
    rewards in fewer moves. Steps without a hash (records from before hashes were kept) are never cut."""
    score_before, last = [], {}
    score = steps[0].score - steps[0].reward if steps else 0
    for k, step in enumerate(steps):
        score_before.append(score)
        score = step.score
        if step.state_hash is not None:
            last[(step.state_hash, score_before[k])] = k
    out, k = [], 0
    while k < len(steps):
        k = last.get((steps[k].state_hash, score_before[k]), k) if steps[k].state_hash is not None else k
        out.append(steps[k])
        k += 1
    return out


def robust_best(cells: list[Cell], scores: Callable[[Cell], tuple[float, ...]],
                cache: dict[tuple[str, int], tuple[float, ...]]) -> Optional[tuple[Cell, tuple[float, ...]]]:
    """The cell whose `scores` (what a trajectory holds over other game seeds: its mean score, then how safe its
    end is) is highest, compared in order; on ties the higher archive score, then the shorter trajectory. `cache`
    keeps each (cell, trajectory length)'s figures, so a trajectory is replayed once."""
    best: Optional[tuple[Cell, tuple[float, ...]]] = None
    for cell in cells:
        key = (cell.key, cell.length)
        if key not in cache:
            cache[key] = tuple(float(v) for v in scores(cell))
        value = cache[key]
        if best is None or (value, cell.score, -cell.length) > (best[1], best[0].score, -best[0].length):
            best = (cell, value)
    return best


def demo_steps(cell: Cell, cut_loops: bool = False) -> list[StepRecord]:
    """The steps of the trajectory to `cell` that the learners imitate: with `cut_loops`, without the detours
    back to a state already passed through (`without_loops`)."""
    steps = trace_steps(cell.trace)
    return without_loops(steps) if cut_loops else steps


def shorten(actions: list[T], scores: Callable[[list[T]], list[float]], max_passes: int = 4,
            span: int = 1) -> tuple[list[T], list[float]]:
    """`actions` without every move the score does not need, and what the moves kept score on each seed: each run
    of `span` moves in turn (last first), then of one fewer, down to single moves, is left out where the trajectory
    without it scores, under every game seed `scores` plays it on, at least what it scored with it; passes repeat
    until none can go (at most `max_passes`). Exploration's random tries leave moves that change the world but
    lead nowhere (put down, take, close), and detours that only a run of moves undoes (a walk around and back);
    imitating them costs the learners steps and accuracy."""
    best = list(scores(actions))
    for _ in range(max_passes):
        before = len(actions)
        for width in range(span, 0, -1):
            for k in reversed(range(len(actions) - width + 1)):
                without = actions[:k] + actions[k + width:]
                held = list(scores(without))
                if all(new >= old for new, old in zip(held, best)):
                    actions, best = without, held
        if len(actions) == before:
            break
    return actions, best


def demo_segment(cell: Cell, discount: float, cut_loops: bool = False,
                 steps: Optional[list[StepRecord]] = None, smoothing: float = 0.0) -> GameSegment:
    """The trajectory to `cell` as one segment the learners imitate (`demo_steps`, or `steps` where given, e.g.
    those of a shortened trajectory): each step's policy target is the action taken (one-hot, or with
    `smoothing` ε: 1 − ε on it and ε spread evenly over the step's valid actions) and its stored value the
    discounted return still to come along the trajectory."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"demo smoothing must lie in [0, 1), got {smoothing}")
    steps = demo_steps(cell, cut_loops) if steps is None else steps
    out: list[StepRecord] = []
    to_go = 0.0
    for step in reversed(steps):
        to_go = step.reward + discount * to_go
        n = len(step.valid_actions)
        target = [smoothing / n] * n
        target[step.action_index] += 1.0 - smoothing
        out.append(replace(step, visit_dist=target, policy_target=target, root_value=to_go, terminal=False,
                           truncated=False, env_state=None))
    out.reverse()
    if out:  # the value after the trajectory's end is unknown: no bootstrap past it
        out[-1] = replace(out[-1], truncated=True)
    return GameSegment(episode_id=f"demo-{cell.key}-{cell.length}-{len(out)}", index=0, start_step=0, steps=out)


"""Game segments and the replay buffer: what search saw and did, sampled for unrolled training."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .checkpoint import fsync_path
from .errors import CheckpointError


@dataclass
class StepRecord:
    """One env step as collected: inputs to search, its outputs, and what happened."""

    observation: str
    valid_actions: list[str]
    action_index: int
    action: str
    reward: float
    score: int
    visit_dist: list[float]  # MCTS root visit distribution over valid_actions
    root_value: float
    policy_target: Optional[list[float]] = None  # world-model policy target when it differs from visit_dist
    llm_prior: Optional[list[float]] = None  # log-prior over valid_actions, when an LLM was used
    prompt: Optional[str] = None  # rendered LLM prompt, so the LLM trains on exactly what it saw
    terminal: bool = False  # game over or won after this step (no bootstrap beyond it)
    truncated: bool = False  # episode cut (step limit, stuck valid-action worker)
    env_state: Optional[str] = None  # the env before `action`, as ppo.env_state.encode_state wrote it (PPO replays from it)
    state_hash: Optional[str] = None  # the world state `action` was taken in (TimeStep.state_hash)


ABSORBING = ""  # the observation after the game's end: no text a game's step shows


def absorbing_step(last: StepRecord, rng: np.random.Generator) -> StepRecord:
    """A step in MuZero's absorbing state after `last` ended the game: an empty observation, one of the last
    step's moves drawn at random (whatever the move, nothing happens), no reward, no policy to learn, value 0."""
    actions = last.valid_actions or [last.action]
    k = int(rng.integers(len(actions)))
    return StepRecord(observation=ABSORBING, valid_actions=list(actions), action_index=k, action=actions[k],
                      reward=0.0, score=last.score, visit_dist=[], root_value=0.0, terminal=True)


@dataclass
class GameSegment:
    """Up to `segment_length` consecutive steps of one episode; segments of an episode chain by index."""

    episode_id: str
    index: int  # position of this segment within its episode
    start_step: int
    steps: list[StepRecord] = field(default_factory=list)
    iteration: int = 0
    # An episode that started from an archived state: the last steps of the trajectory that reached it (on the
    # first segment only), history for the training windows of its first steps, never trained on themselves.
    context: list[StepRecord] = field(default_factory=list)
    # Steps that lost points in search-free exploration (`hazard_segments`): sampled apart, by `hazard_fraction`.
    hazard: bool = False

    @property
    def ended(self) -> bool:
        return bool(self.steps) and (self.steps[-1].terminal or self.steps[-1].truncated)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "GameSegment":
        data = json.loads(text)
        steps = [StepRecord(**s) for s in data.pop("steps")]
        context = [StepRecord(**s) for s in data.pop("context", [])]
        return cls(steps=steps, context=context, **data)


@dataclass
class SampledSequence:
    """`length` consecutive steps from position t of an episode, padded past its end."""

    steps: list[Optional[StepRecord]]
    context: list[StepRecord]  # up to `context` real steps before the first one
    value_targets: np.ndarray  # n-step targets, [length]
    # With `reanalyse`: each target as `value_partial + bootstrap_discount * V(step i + bootstrap_offset)`, the
    # offset -1 where the target does not bootstrap from a state inside the sequence (the game ended, or the state
    # lies past the sequence's end); `value_targets` holds the same target with the stored search value as V.
    value_partial: Optional[np.ndarray] = None
    bootstrap_discount: Optional[np.ndarray] = None
    bootstrap_offset: Optional[np.ndarray] = None


class ReplayBuffer:
    """Segments in memory (bounded by total steps), persisted as one gzip JSON-lines file per iteration."""

    def __init__(self, capacity_steps: int, discount: float, n_step: int, seed: int = 0, hazard_capacity: int = 1000,
                 absorbing: bool = False, td_lambda: float = 1.0):
        self.absorbing = absorbing  # sequences go on past the game's end in the absorbing state (absorbing_step)
        self.td_lambda = td_lambda  # 1: the n-step return; below 1: the λ-return over the same n steps
        self.capacity_steps = capacity_steps
        self.discount = discount
        self.n_step = n_step
        self.segments: deque[GameSegment] = deque()
        self.num_steps = 0
        self._episodes: dict[str, dict[int, GameSegment]] = {}
        self.rng = np.random.default_rng(seed)  # sampling; its state is checkpointed
        self.demos: list[GameSegment] = []  # trajectories to imitate (archive.demo_segment), kept apart
        self.hazards: deque[GameSegment] = deque()  # the newest `hazard_capacity` hazard segments, kept apart
        self.hazard_capacity = hazard_capacity

    def set_demos(self, segments: Iterable[GameSegment]) -> None:
        """Replace the demonstrations that `sample` mixes in; they are not counted in the buffer's steps."""
        for seg in self.demos:
            self._episodes.pop(seg.episode_id, None)
        self.demos = [seg for seg in segments if seg.steps]
        for seg in self.demos:
            self._episodes[seg.episode_id] = {seg.index: seg}

    def __len__(self) -> int:
        return self.num_steps

    def add(self, segments: Iterable[GameSegment]) -> None:
        """Store segments, the oldest going first past the capacity; hazard segments go to their own pool (not
        counted in the buffer's steps)."""
        for seg in segments:
            if not seg.steps:
                continue
            if seg.hazard:
                self.hazards.append(seg)
                self._episodes[seg.episode_id] = {seg.index: seg}
                if len(self.hazards) > self.hazard_capacity:
                    self._episodes.pop(self.hazards.popleft().episode_id, None)
                continue
            self.segments.append(seg)
            self._episodes.setdefault(seg.episode_id, {})[seg.index] = seg
            self.num_steps += len(seg.steps)
        while self.num_steps > self.capacity_steps and len(self.segments) > 1:
            old = self.segments.popleft()
            self.num_steps -= len(old.steps)
            chain = self._episodes.get(old.episode_id, {})
            chain.pop(old.index, None)
            if not chain:
                self._episodes.pop(old.episode_id, None)

    def recent(self, max_steps: int) -> list[tuple[GameSegment, int]]:
        """The most recent (segment, position) pairs, newest last."""
        out: list[tuple[GameSegment, int]] = []
        for seg in reversed(self.segments):
            for t in range(len(seg.steps) - 1, -1, -1):
                out.append((seg, t))
                if len(out) >= max_steps:
                    return out[::-1]
        return out[::-1]

    # --- episode navigation across chained segments ---
    def _step_at(self, seg: GameSegment, t: int) -> Optional[StepRecord]:
        """The step `t` positions from the start of `seg`, following the episode chain either way."""
        chain = self._episodes.get(seg.episode_id, {})
        idx = seg.index
        while True:
            cur = chain.get(idx)
            if cur is None:
                return None
            if t < 0:
                prev = chain.get(idx - 1)
                if prev is None:  # the episode's start: before it, only the trajectory it returned along
                    return cur.context[t] if t >= -len(cur.context) else None
                idx -= 1
                t += len(prev.steps)
                continue
            if t < len(cur.steps):
                return cur.steps[t]
            t -= len(cur.steps)
            idx += 1

    def value_target(self, seg: GameSegment, t: int) -> float:
        """n-step return bootstrapped from stored root values.

        Where the data stops early (episode still running, or cut by a step limit) the last
        available step's root value stands in for its own reward plus everything after it.
        """
        return self._stored_target(seg, t, self.value_parts(seg, t))

    def _stored_target(self, seg: GameSegment, t: int, parts: tuple[float, float, Optional[int]]) -> float:
        """`value_parts` of step t put together with the search value stored at the step it bootstraps from; with
        `td_lambda` < 1, the λ-return over the same steps instead."""
        partial, discount, offset = parts
        if self.td_lambda < 1.0:
            return self._lambda_return(seg, t, offset)
        return partial if offset is None else partial + discount * self._step_at(seg, t + offset).root_value

    def _lambda_return(self, seg: GameSegment, t: int, offset: Optional[int]) -> float:
        """G_i = r_i + γ((1 − λ)·V_{i+1} + λ·G_{i+1}) backwards from where the n-step return stops: G = V of the
        step it bootstraps from (`offset`), or, where the game ended (`offset` None), the last step's reward alone.
        V are the search values stored at collection; λ = 1 gives the n-step return, λ = 0 the one-step TD target."""
        lam, gamma = self.td_lambda, self.discount
        if offset is None:  # the game ended at the last step before n
            last = next(i for i in range(self.n_step) if self._step_at(seg, t + i).terminal)
            g = self._step_at(seg, t + last).reward
        else:
            last, g = offset, self._step_at(seg, t + offset).root_value
        for i in range(last - 1, -1, -1):
            after = self._step_at(seg, t + i + 1).root_value
            g = self._step_at(seg, t + i).reward + gamma * ((1.0 - lam) * after + lam * g)
        return g

    def value_parts(self, seg: GameSegment, t: int) -> tuple[float, float, Optional[int]]:
        """The n-step target of step t as (discounted rewards, discount, offset): the target is the rewards plus
        discount x the value of the step `offset` steps on (None: the game ended, nothing to bootstrap from)."""
        target, gamma = 0.0, 1.0
        for i in range(self.n_step):
            step = self._step_at(seg, t + i)
            if step.terminal:
                return target + gamma * step.reward, 0.0, None
            if step.truncated or self._step_at(seg, t + i + 1) is None:
                return target, gamma, i
            target += gamma * step.reward
            gamma *= self.discount
        return target, gamma, self.n_step

    def sequence(self, seg: GameSegment, t: int, length: int, context: int, reanalyse: bool = False) -> SampledSequence:
        """`length` steps from step `t` of `seg` (None where the data stops; with `absorbing`, absorbing steps
        after the game's end), the `context` steps before them, and the value targets (with `reanalyse`, also
        split into the parts a learner re-bootstraps from its own value of a later step of the sequence)."""
        steps: list[Optional[StepRecord]] = []
        absorbed: list[bool] = []  # an absorbing step, after the game's end
        stopped, last = False, None  # last: the step that ended the game, when absorbing steps follow it
        for i in range(length):
            if stopped:
                steps.append(absorbing_step(last, self.rng) if last is not None else None)
                absorbed.append(last is not None)
                continue
            step = self._step_at(seg, t + i)
            steps.append(step)
            absorbed.append(False)
            if step is None or step.terminal or step.truncated:
                stopped = True
                last = step if step is not None and step.terminal and self.absorbing else None
        ctx = []
        for i in range(1, context + 1):
            prev = self._step_at(seg, t - i)
            if prev is None or prev.terminal or prev.truncated:
                break
            ctx.append(prev)
        parts = [self.value_parts(seg, t + i) if s is not None and not absorbed[i] else None
                 for i, s in enumerate(steps)]
        targets = np.array([0.0 if p is None else self._stored_target(seg, t + i, p) for i, p in enumerate(parts)])
        out = SampledSequence(steps=steps, context=ctx[::-1], value_targets=targets.astype(np.float32))
        if reanalyse:
            out.value_partial = targets.astype(np.float32)
            out.bootstrap_discount = np.zeros(length, dtype=np.float32)
            out.bootstrap_offset = np.full(length, -1, dtype=np.int64)
            for i, p in enumerate(parts):
                if p is not None and p[2] is not None and i + p[2] < length and steps[i + p[2]] is not None:
                    out.value_partial[i], out.bootstrap_discount[i], out.bootstrap_offset[i] = p
        return out

    def sample(self, batch_size: int, length: int, context: int, demo_fraction: float = 0.0,
               hazard_fraction: float = 0.0, reanalyse: bool = False) -> list[SampledSequence]:
        """Uniform over stored steps; with demonstrations set, `demo_fraction` of the batch (rounded) is drawn
        uniformly over their steps instead, and with hazards stored, `hazard_fraction` over theirs. `reanalyse`
        splits the collected steps' targets for re-bootstrapping; a demonstration's targets are its exact returns
        and a hazard's end its own reward, so theirs are kept as stored."""
        if not self.segments:
            raise ValueError("replay buffer is empty")
        demos = round(batch_size * demo_fraction) if self.demos else 0
        hazards = min(round(batch_size * hazard_fraction), batch_size - demos) if self.hazards else 0
        return (self._uniform(self.segments, batch_size - demos - hazards, length, context, reanalyse)
                + self._uniform(self.demos, demos, length, context)
                + self._uniform(self.hazards, hazards, length, context))

    def _uniform(self, segments: Sequence[GameSegment], n: int, length: int, context: int,
                 reanalyse: bool = False) -> list[SampledSequence]:
        if n == 0:
            return []
        sizes = np.array([len(s.steps) for s in segments], dtype=np.int64)
        flat = self.rng.integers(0, int(sizes.sum()), size=n)
        bounds = np.cumsum(sizes)
        seg_idx = np.searchsorted(bounds, flat, side="right")
        out = []
        for k, i in zip(flat, seg_idx):
            seg = segments[int(i)]
            t = int(k - (bounds[i] - sizes[i]))
            out.append(self.sequence(seg, t, length, context, reanalyse))
        return out

    def demo_steps(self) -> list[tuple[GameSegment, int]]:
        """Every (segment, position) of the demonstrations."""
        return [(seg, t) for seg in self.demos for t in range(len(seg.steps))]

    # --- persistence ---
    @staticmethod
    def write_segments(path: Path, segments: list[GameSegment]) -> None:
        """Atomic: a reader sees the whole file or none of it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:  # no name or time in it
                for seg in segments:
                    gz.write(seg.to_json().encode() + b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)

    @staticmethod
    def read_segments(path: Path) -> list[GameSegment]:
        try:
            with gzip.open(path, "rt") as fh:
                return [GameSegment.from_json(line) for line in fh if line.strip()]
        except (OSError, EOFError, ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"replay file {path} is corrupt ({type(err).__name__}: {err})") from None

    @staticmethod
    def segment_file(replay_dir: Path, iteration: int, tag: str) -> Path:
        return replay_dir / f"iter-{iteration:06d}-{tag}.jsonl.gz"

    @staticmethod
    def content_tag(segments: list[GameSegment]) -> str:
        """A file tag from what the segments hold: a re-run iteration that collects something else never
        overwrites earlier data, and one that collects the same writes the same file."""
        h = hashlib.sha256()
        for seg in segments:
            h.update(seg.to_json().encode())
        return h.hexdigest()[:10]

    @staticmethod
    def set_aside_after(replay_dir: Path, iteration: int) -> list[Path]:
        """Rename the files of iterations after `iteration` out of `load_dir`'s way (a resume from that
        iteration's checkpoint collects them again); nothing is deleted. Returns the new paths."""
        moved = []
        for path in sorted(Path(replay_dir).glob("iter-*.jsonl.gz")):
            if int(path.name.split("-")[1]) > iteration:
                aside = path.with_name(f"{path.name}.after-checkpoint-{time.time_ns()}")
                os.replace(path, aside)
                moved.append(aside)
        if moved:
            fsync_path(Path(replay_dir))
        return moved

    def load_dir(self, replay_dir: Path, up_to: Optional[int] = None) -> int:
        """Load every complete per-iteration file (of iterations up to `up_to`) in collection order; returns
        segments loaded."""
        count = 0
        files = sorted(Path(replay_dir).glob("iter-*.jsonl.gz"), key=lambda p: (p.name.split("-")[1], p.stat().st_mtime))
        for path in files:
            if up_to is not None and int(path.name.split("-")[1]) > up_to:
                continue
            segs = self.read_segments(path)
            self.add(segs)
            count += len(segs)
        return count

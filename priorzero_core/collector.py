"""Collector: N envs stepped together, one batched search per step, finished steps cut into segments.

With an `Archive` (Go-Explore), an episode starts either from the game's start or from an archived cell,
restored from its snapshot with the trajectory that reached it as history, and explores `explore.steps`
steps from there; every state reached is offered to the archive.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from . import faults
from .agent import Agent, Decision, EnvView, kept_actions, uniform_decision
from .archive import Archive, Trace, trace_steps
from .config import ExploreConfig, PriorZeroConfig
from .outcomes import Counts
from .outcomes import merge as merge_outcomes
from .outcomes import record as count_outcome
from .ppo.env_state import encode_state, state_bytes, state_from_bytes
from .replay import GameSegment, StepRecord


@dataclass
class _Running:
    """One env's episode in progress."""

    episode_id: str
    view: EnvView
    segment: GameSegment
    episode_return: float = 0.0
    steps: int = 0
    trace: Optional[Trace] = None  # the steps from the game's start (through the archived ones it returned to)
    steps_left: Optional[int] = None  # an episode that returned to a cell explores this many more steps


def _copy(r: _Running) -> _Running:
    """A copy that collection's in-place changes (history, segment steps) leave alone; records and traces are
    never changed in place."""
    seg = replace(r.segment, steps=list(r.segment.steps), context=list(r.segment.context))
    return replace(r, view=EnvView(history=list(r.view.history), timestep=r.view.timestep), segment=seg)


@dataclass
class CollectStats:
    env_steps: int = 0
    episodes: int = 0
    returns: list[float] = field(default_factory=list)
    scores: list[int] = field(default_factory=list)
    wins: int = 0
    seconds: float = 0.0
    returns_to_cells: int = 0
    # each move taken and whether it lost the game, by the state it was taken in (outcomes.LossMemory's counts)
    outcomes: Counts = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {
            "collect/env_steps": float(self.env_steps),
            "collect/episodes": float(self.episodes),
            "collect/steps_per_s": self.env_steps / max(self.seconds, 1e-9),
        }
        if self.returns:  # episodes from the game's start
            out["collect/episode_return_mean"] = float(np.mean(self.returns))
            out["collect/win_rate"] = self.wins / len(self.returns)
        if self.scores:
            out["collect/score_max"] = float(max(self.scores))
        out["explore/returns_to_cells"] = float(self.returns_to_cells)
        return out

    def add(self, other: "CollectStats") -> None:
        """Sums `other`'s counts into these (the shards' stages into one); `seconds` stays this stage's own."""
        self.env_steps += other.env_steps
        self.episodes += other.episodes
        self.returns += other.returns
        self.scores += other.scores
        self.wins += other.wins
        self.returns_to_cells += other.returns_to_cells
        merge_outcomes(self.outcomes, other.outcomes)


class UniformActor:
    """Stands in for the agent in search-free exploration: every step uniform over the valid actions, no LLM."""

    def __init__(self, rng: np.random.Generator, limit: int):
        self.rng, self.limit = rng, limit  # limit: the valid actions kept per step, as the agent keeps them

    def act(self, views, mode="collect") -> list[Decision]:
        return [uniform_decision(kept_actions(v.timestep, self.limit), self.rng) for v in views]

    def llm_prior(self, view: EnvView, valid: list[str]) -> tuple[None, None]:
        return None, None


class Collector:
    """Plays `pool` with the agent's search policy; episodes continue across collect calls."""

    def __init__(self, pool, agent: Agent, segment_length: int, epsilon: float, rng: np.random.Generator,
                 archive: Optional[Archive] = None, explore: Optional[ExploreConfig] = None, context: int = 0,
                 loss_penalty: float = 0.0):
        self.pool = pool
        self.agent = agent
        self.segment_length = segment_length
        self.epsilon = epsilon
        self.rng = rng
        self.archive = archive
        self.explore = explore or ExploreConfig(enabled=archive is not None)
        self.context = context  # steps of a returned-to trajectory kept as its episode's history in the replay
        self.loss_penalty = loss_penalty  # taken from the stored reward of a move that ends the game unwon
        self._running: list[Optional[_Running]] = []
        self.record_env_state = False  # ~13 KB per Zork step; only PPO's reward needs it

    def _start(self, indices: list[int], stats: CollectStats) -> list[_Running]:
        """New episodes in envs `indices`: each from an archived cell, or (a `from_start` share, and always
        without an archive) from the game's start."""
        restored: dict[int, _Running] = {}
        fresh = []
        for i in indices:
            if self.archive is None or not len(self.archive) or self.rng.random() < self.explore.from_start:
                fresh.append(i)
                continue
            cell = self.archive.choose()
            ts = self.pool.set_state(i, cell.state)
            path = trace_steps(cell.trace)
            history = [(s.observation, s.action, s.reward) for s in path]
            # How that trajectory's own episode ended is not this one's business: no flags in its history.
            recent = path[max(0, len(path) - self.context):] if self.context else []
            context = [replace(s, terminal=False, truncated=False) for s in recent]
            eid = self._episode_id()
            segment = GameSegment(eid, 0, cell.length, context=context)
            restored[i] = _Running(eid, EnvView(history=history, timestep=ts), segment, steps=cell.length,
                                   trace=cell.trace, steps_left=self.explore.steps)
            stats.returns_to_cells += 1
        for i, ts in zip(fresh, self.pool.reset(fresh)):
            eid = self._episode_id()
            restored[i] = _Running(eid, EnvView(history=[], timestep=ts), GameSegment(eid, 0, 0))
            self._offer(i, restored[i])
        return [restored[i] for i in indices]

    def _episode_id(self) -> str:
        """From the run's RNG, so a run and its resumed or retried copy name their episodes alike."""
        return self.rng.bytes(6).hex()

    def _explore_action(self, d: Decision, view: EnvView) -> int:
        """An action to try after a return: drawn from the LLM's prior (scored now if search ran without it, and
        then kept with the step), uniformly without an LLM."""
        if d.llm_prior is None:
            d.prompt, d.llm_prior = self.agent.llm_prior(view, d.valid_actions)
        if d.llm_prior is None:
            return int(self.rng.integers(len(d.valid_actions)))
        p = np.exp(np.asarray(d.llm_prior, dtype=np.float64))
        return int(self.rng.choice(len(p), p=p / p.sum()))

    def _offer(self, i: int, r: _Running) -> None:
        """Tell the archive about env i's current state (not a finished episode's: nothing follows it)."""
        if self.archive is not None and not r.view.timestep.done:
            self.archive.visit(self.pool.cell_key(i), r.view.timestep.score, r.trace, lambda: self.pool.get_state(i))

    def collect(self, num_steps: int, iteration: int = 0, progress: bool = False) -> tuple[list[GameSegment], CollectStats]:
        """`num_steps` steps in each env; returns finished segments (and the partial ones, so nothing waits)."""
        stats = CollectStats()
        t0 = time.perf_counter()
        if not self._running:
            self._running = self._start(list(range(self.pool.size)), stats)
        done_segments: list[GameSegment] = []
        bar = tqdm(total=num_steps * len(self._running), desc=f"collect {iteration}", unit="step", disable=not progress, leave=False)
        for step in range(num_steps):
            if step == 1:
                faults.inject("collect-step", iteration)  # test hook: fail mid-stage, after the first step
            decisions = self.agent.act([r.view for r in self._running], mode="collect")
            actions = []
            for d, r in zip(decisions, self._running):
                idx = d.action_index
                if self.epsilon and self.rng.random() < self.epsilon:
                    idx = int(self.rng.integers(len(d.valid_actions)))
                elif r.steps_left is not None and self.rng.random() < self.explore.epsilon:
                    idx = self._explore_action(d, r.view)
                actions.append(d.valid_actions[idx])
                d.action_index, d.action = idx, d.valid_actions[idx]
            states = [encode_state(self.pool.get_state(i)) for i in range(len(actions))] if self.record_env_state else None
            next_steps = self.pool.step(actions)
            resets: list[int] = []
            for i, (d, r, ts) in enumerate(zip(decisions, self._running, next_steps)):
                if r.steps_left is not None:
                    r.steps_left -= 1
                out_of_steps = not ts.done and r.steps_left == 0  # its exploration budget is spent
                truncated = (ts.done and ts.truncated) or out_of_steps
                terminal = ts.done and not truncated
                record = StepRecord(
                    observation=r.view.timestep.observation,
                    valid_actions=d.valid_actions,
                    action_index=d.action_index,
                    action=d.action,
                    reward=float(ts.reward) - (self.loss_penalty if terminal and not ts.won else 0.0),
                    score=int(ts.score),
                    visit_dist=[float(x) for x in d.visit_dist],
                    root_value=float(d.root_value),
                    policy_target=[float(x) for x in d.policy_target],
                    llm_prior=None if d.llm_prior is None else [float(x) for x in d.llm_prior],
                    prompt=d.prompt,
                    terminal=bool(terminal),
                    truncated=bool(truncated),
                    env_state=states[i] if states else None,
                    state_hash=r.view.timestep.state_hash,
                )
                r.segment.steps.append(record)
                count_outcome(stats.outcomes, r.view.timestep, d.action, lost=terminal and not ts.won)
                r.trace = Trace.extend(r.trace, record) if self.archive is not None else None
                r.view.history.append((r.view.timestep.observation, d.action, float(ts.reward)))
                r.view.timestep = ts
                r.episode_return += ts.reward
                r.steps += 1
                stats.env_steps += 1
                self._offer(i, r)
                if ts.done or out_of_steps:
                    stats.episodes += 1
                    stats.scores.append(ts.score)
                    if r.steps_left is None:
                        stats.returns.append(r.episode_return)
                        stats.wins += int(ts.won)
                    done_segments.append(r.segment)
                    resets.append(i)
                elif len(r.segment.steps) >= self.segment_length:
                    done_segments.append(r.segment)
                    r.segment = GameSegment(r.episode_id, r.segment.index + 1, r.steps)
            for i, r in zip(resets, self._start(resets, stats)):
                self._running[i] = r
            bar.update(len(self._running))
        bar.close()
        # Partial segments are handed over too; the episode's next steps continue the chain.
        for r in self._running:
            if r.segment.steps:
                done_segments.append(r.segment)
                r.segment = GameSegment(r.episode_id, r.segment.index + 1, r.steps)
        for seg in done_segments:
            seg.iteration = iteration
        stats.seconds = time.perf_counter() - t0
        return done_segments, stats

    def explore_only(self, num_steps: int, iteration: int = 0) -> tuple[list[GameSegment], CollectStats]:
        """`num_steps` steps in each env from new episodes, which end with the call (search-free exploration,
        `explore.random_steps`): the archive keeps what they found; their segments are returned for
        `hazard_segments`, not for the replay."""
        self._running = []
        try:
            return self.collect(num_steps, iteration)
        finally:
            self._running = []

    def running_traces(self) -> list[Optional[Trace]]:
        """The trajectories (from the game's start) of the episodes in progress."""
        return [r.trace for r in self._running]

    def snapshot(self) -> list[tuple[Any, _Running]]:
        """The episodes in progress, in memory, for `restore` (a collect that fails part-way starts over from here)."""
        return [(self.pool.get_state(i), _copy(r)) for i, r in enumerate(self._running)]

    def restore(self, snapshot: list[tuple[Any, _Running]]) -> None:
        self._running = []
        for i, (env_state, r) in enumerate(snapshot):
            r = _copy(r)
            r.view.timestep = self.pool.set_state(i, env_state)
            self._running.append(r)

    def state(self) -> dict[str, Any]:
        """The episodes in progress, JSON-safe: each env's snapshot, what the agent has seen, the segment being
        filled and (with an archive) the trajectory from the game's start. `load_state` continues them exactly."""
        out = []
        for i, r in enumerate(self._running):
            out.append({
                "env": base64.b64encode(state_bytes(self.pool.get_state(i))).decode("ascii"),
                "episode_id": r.episode_id,
                "history": [list(h) for h in r.view.history],
                "segment": asdict(r.segment),
                "episode_return": r.episode_return,
                "steps": r.steps,
                "trace": None if r.trace is None else [asdict(s) for s in r.trace.steps()],
                "steps_left": r.steps_left,
            })
        return {"running": out}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the envs and episodes a checkpoint's `state` describes (`restore` undoes a failed collect)."""
        running = state["running"]
        if running and len(running) != self.pool.size:
            raise ValueError(f"collector state has {len(running)} envs; this run has {self.pool.size}")
        self._running = []
        self._running = []
        for i, row in enumerate(running):
            ts = self.pool.set_state(i, state_from_bytes(base64.b64decode(row["env"])))
            trace = None
            for step in row["trace"] or []:
                trace = Trace.extend(trace, StepRecord(**step))
            seg = dict(row["segment"])
            steps = [StepRecord(**s) for s in seg.pop("steps")]
            context = [StepRecord(**s) for s in seg.pop("context")]
            history = [(obs, act, float(rew)) for obs, act, rew in row["history"]]
            self._running.append(_Running(row["episode_id"], EnvView(history=history, timestep=ts),
                                          GameSegment(steps=steps, context=context, **seg),
                                          float(row["episode_return"]), int(row["steps"]), trace, row["steps_left"]))


def hazard_segments(segments: list[GameSegment], steps: int, context: int) -> list[GameSegment]:
    """The moves of `segments` (whole episodes' chains, as `explore_only` returns them) that lost points or ended
    the game without any, each as a segment of its last `steps` steps with up to `context` steps of history:
    training windows that teach reward, value and dynamics what the move costs. The policy learns nothing from
    them (no policy target), and the last step's stored value is its own reward, so a return cut there is that
    reward."""
    episodes: dict[str, list[GameSegment]] = {}
    for seg in segments:
        episodes.setdefault(seg.episode_id, []).append(seg)
    out = []
    for eid, chain in episodes.items():
        chain.sort(key=lambda seg: seg.index)
        head = list(chain[0].context) if chain[0].index == 0 else []
        moves = [s for seg in chain for s in seg.steps]
        for p, step in enumerate(moves):
            if not (step.reward < 0 or (step.terminal and step.reward <= 0)):
                continue
            first = max(0, p - steps + 1)
            kept = [replace(s, visit_dist=[], policy_target=None, llm_prior=None, prompt=None, env_state=None)
                    for s in moves[first:p + 1]]
            kept[-1] = replace(kept[-1], root_value=step.reward, truncated=not step.terminal)
            history = (head + moves[:first])[max(0, len(head) + first - context):] if context else []
            history = [replace(s, terminal=False, truncated=False, env_state=None) for s in history]
            out.append(GameSegment(f"{eid}-hazard-{p}", 0, first, steps=kept, iteration=chain[0].iteration,
                                   context=history, hazard=True))
    return out


class SearchFreeExplorer:
    """Search-free exploration (`explore.random_steps`) over `pool`, its own envs: every episode returns to an
    archived cell and takes uniform actions for `explore.random_steps / explore.random_envs` steps an env; the
    archive keeps what they found, and what they lost comes back as hazard segments (`explore.hazard_fraction`)."""

    def __init__(self, pool, cfg: PriorZeroConfig, archive: Archive, rng: np.random.Generator, action_limit: int):
        self.pool = pool
        self.collector = Collector(pool, UniformActor(rng, action_limit), cfg.collect.segment_length, 0.0, rng,
                                   archive, cfg.explore.model_copy(update={"from_start": 0.0}),
                                   loss_penalty=cfg.collect.loss_penalty)
        self.steps_per_env = -(-cfg.explore.random_steps // cfg.explore.random_envs)
        self.hazard_steps = cfg.explore.hazard_steps if cfg.explore.hazard_fraction else 0
        self.context = cfg.world_model.context_length - 1

    def explore(self, iteration: int) -> tuple[CollectStats, list[GameSegment]]:
        """One stage's steps -> its stats and hazard segments (none unless `explore.hazard_fraction`)."""
        wandered, stats = self.collector.explore_only(self.steps_per_env, iteration)
        hazards = hazard_segments(wandered, self.hazard_steps, self.context) if self.hazard_steps else []
        return stats, hazards

    def close(self) -> None:
        self.pool.close()

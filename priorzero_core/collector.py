"""Collector: N envs stepped together, one batched search per step, finished steps cut into segments."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .agent import Agent, EnvView
from .ppo.env_state import encode_state
from .games.base import TimeStep
from .replay import GameSegment, StepRecord


@dataclass
class _Running:
    """One env's episode in progress."""

    episode_id: str
    view: EnvView
    segment: GameSegment
    episode_return: float = 0.0
    steps: int = 0


@dataclass
class CollectStats:
    env_steps: int = 0
    episodes: int = 0
    returns: list[float] = field(default_factory=list)
    scores: list[int] = field(default_factory=list)
    wins: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {
            "collect/env_steps": float(self.env_steps),
            "collect/episodes": float(self.episodes),
            "collect/steps_per_s": self.env_steps / max(self.seconds, 1e-9),
        }
        if self.returns:
            out["collect/episode_return_mean"] = float(np.mean(self.returns))
            out["collect/score_max"] = float(max(self.scores))
            out["collect/win_rate"] = self.wins / len(self.returns)
        return out


class Collector:
    """Plays `pool` with the agent's search policy; episodes continue across collect calls."""

    def __init__(self, pool, agent: Agent, segment_length: int, epsilon: float, rng: np.random.Generator):
        self.pool = pool
        self.agent = agent
        self.segment_length = segment_length
        self.epsilon = epsilon
        self.rng = rng
        self._running: list[Optional[_Running]] = []
        self.record_env_state = False  # ~13 KB per Zork step; only PPO's reward needs it

    def _start(self, ts: TimeStep) -> _Running:
        eid = uuid.uuid4().hex[:12]
        return _Running(eid, EnvView(history=[], timestep=ts), GameSegment(eid, 0, 0))

    def collect(self, num_steps: int, iteration: int = 0, progress: bool = False) -> tuple[list[GameSegment], CollectStats]:
        """`num_steps` steps in each env; returns finished segments (and the partial ones, so nothing waits)."""
        stats = CollectStats()
        t0 = time.perf_counter()
        if not self._running:
            self._running = [self._start(ts) for ts in self.pool.reset_all()]
        done_segments: list[GameSegment] = []
        bar = tqdm(total=num_steps * len(self._running), desc=f"collect {iteration}", unit="step", disable=not progress, leave=False)
        for _ in range(num_steps):
            decisions = self.agent.act([r.view for r in self._running], mode="collect")
            actions = []
            for d, r in zip(decisions, self._running):
                idx = d.action_index
                if self.epsilon and self.rng.random() < self.epsilon:
                    idx = int(self.rng.integers(len(d.valid_actions)))
                actions.append(d.valid_actions[idx])
                d.action_index, d.action = idx, d.valid_actions[idx]
            states = [encode_state(self.pool.get_state(i)) for i in range(len(actions))] if self.record_env_state else None
            next_steps = self.pool.step(actions)
            resets: list[int] = []
            for i, (d, r, ts) in enumerate(zip(decisions, self._running, next_steps)):
                truncated = ts.done and ts.truncated
                r.segment.steps.append(
                    StepRecord(
                        observation=r.view.timestep.observation,
                        valid_actions=d.valid_actions,
                        action_index=d.action_index,
                        action=d.action,
                        reward=float(ts.reward),
                        score=int(ts.score),
                        visit_dist=[float(x) for x in d.visit_dist],
                        root_value=float(d.root_value),
                        policy_target=[float(x) for x in d.policy_target],
                        llm_prior=None if d.llm_prior is None else [float(x) for x in d.llm_prior],
                        prompt=d.prompt,
                        terminal=bool(ts.done and not truncated),
                        truncated=bool(truncated),
                        env_state=states[i] if states else None,
                    )
                )
                r.view.history.append((r.view.timestep.observation, d.action, float(ts.reward)))
                r.view.timestep = ts
                r.episode_return += ts.reward
                r.steps += 1
                stats.env_steps += 1
                if ts.done:
                    stats.episodes += 1
                    stats.returns.append(r.episode_return)
                    stats.scores.append(ts.score)
                    stats.wins += int(ts.won)
                    done_segments.append(r.segment)
                    resets.append(i)
                elif len(r.segment.steps) >= self.segment_length:
                    done_segments.append(r.segment)
                    r.segment = GameSegment(r.episode_id, r.segment.index + 1, r.steps)
            for i, ts in zip(resets, self.pool.reset(resets)):
                self._running[i] = self._start(ts)
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

    def reset(self) -> None:
        """Forget running episodes (after loading a checkpoint the envs start fresh)."""
        self._running = []

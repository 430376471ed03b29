"""Evaluator: greedy episodes with the world model alone, world model + LLM prior, or the LLM prior alone;
and a uniformly random agent over the same valid actions as the baseline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .agent import Agent, Decision, EnvView
from .config import EvalConfig, PriorZeroConfig
from .outcomes import LossMemory, avoid_losses

MODE_NAMES = {"wm": "world model only", "wm_llm": "world model + LLM prior", "llm": "LLM prior only",
              "random": "uniformly random valid action (baseline)"}


@dataclass
class EvalResult:
    metrics: dict[str, float]
    transcript: str


def untried_first(d: Decision, tried: set[str], act_on: str = "improved", max_drop: Optional[float] = None) -> int:
    """The index of the best-ranked action not in `tried` (ranked as the agent acts: by visits, ties to the policy
    target, or by the policy target); the decision's own choice when every action has been tried.

    `max_drop` (eval.break_loops_max_drop): an untried action may replace the choice only if its searched Q lies
    at most this fraction of the Q range (over the valid actions) below the choice's Q or below 0, whichever is
    lower: a loop is broken with a move the search rates about as well as the loop, or expects to lose nothing
    on (such as ending the game), never with one it expects to lose points on; None: any untried action.
    """
    if d.action not in tried:
        return d.action_index
    rank = _rank(d, act_on)
    allowed = _allowed(d, d.action_index, max_drop)
    for idx in np.argsort(-rank, kind="stable"):
        if allowed[idx] and d.valid_actions[idx] not in tried:
            return int(idx)
    return d.action_index


def _rank(d: Decision, act_on: str) -> np.ndarray:
    """How the greedy agent ranks the valid actions: by the policy target, or by visits with ties to it."""
    rank = np.asarray(d.policy_target, dtype=np.float64)
    if act_on == "visits":
        rank = np.asarray(d.visit_dist, dtype=np.float64) + 1e-3 * rank
    return rank


def _allowed(d: Decision, chosen: int, max_drop: Optional[float]) -> np.ndarray:
    """The moves whose searched Q lies at most `max_drop` of the Q range below move `chosen`'s Q or below 0,
    whichever is lower (all moves without Q values, a flat Q or `max_drop` None)."""
    allowed = np.ones(len(d.valid_actions), dtype=bool)
    if max_drop is not None and d.q_values is not None:
        q = np.asarray(d.q_values, dtype=np.float64)
        spread = q.max() - q.min()
        if spread > 0:
            allowed = q >= min(q[chosen], 0.0) - max_drop * spread
    return allowed


def eval_modes(cfg: PriorZeroConfig, has_llm: bool) -> list[str]:
    """The configured evaluation modes this agent can play, its main mode first: the one collection searches
    with (with the LLM in the prior when there is one and `mcts.prior_mode` uses it, else the world model)."""
    modes = [m for m in cfg.eval.modes if has_llm or m in ("wm", "random")]
    main = "wm_llm" if has_llm and cfg.mcts.prior_mode != "wm" else "wm"
    if main in modes:
        modes.remove(main)
        modes.insert(0, main)
    return modes


def evaluate(pool, agent: Agent, modes: list[str], rules: EvalConfig, max_steps: int, progress: bool = False,
             losses: Optional[LossMemory] = None) -> EvalResult:
    """Plays `rules.num_episodes` episodes per mode (envs of `pool` in parallel, episodes in rounds) under the
    evaluation protocol `rules` (the run's `eval.*`), each of at most `max_steps` steps.

    `evals/reward_mean` is the mean final score of the first mode that runs (the agent's main mode: "wm_llm"
    when an LLM is present, else "wm"); every mode also gets its own `evals/<mode>/...` metrics.
    `rules.break_loops`: back in a world state it has been in before this episode, the greedy agent takes its
    best-ranked action not yet taken there (the same action from the same state would go round the same loop),
    ranked as `rules.act_on` says, among the moves `rules.break_loops_max_drop` allows (see `untried_first`).
    `rules.avoid_known_losses` (with the run's `losses`): a move that lost the game at least
    `rules.known_loss_rate` of the times it was taken in such a state is replaced by the best-ranked move that did
    not (`outcomes.avoid_losses`); `evals/<mode>/avoided_losses` counts the replacements per episode.
    """
    metrics: dict[str, float] = {}
    lines: list[str] = []
    t0 = time.perf_counter()
    for mode in modes:
        scores, lengths, wins = [], [], []
        avoided = 0
        avoid = losses is not None and rules.avoid_known_losses and mode != "random"
        remaining = rules.num_episodes
        episode_no = 0
        while remaining > 0:
            n = min(remaining, pool.size)
            remaining -= n
            views = [EnvView(history=[], timestep=ts) for ts in pool.reset(list(range(n)))]
            tried: list[dict[str, set[str]]] = [{} for _ in range(n)]  # per env: state hash -> actions taken there
            active = list(range(n))
            bar = tqdm(total=max_steps, desc=f"eval {mode}", unit="step", disable=not progress, leave=False)
            for _ in range(max_steps):
                if not active:
                    break
                decisions = agent.act([views[i] for i in active], mode=mode)
                if (rules.break_loops or avoid) and mode != "random":
                    for i, d in zip(active, decisions):
                        taken = tried[i].setdefault(views[i].timestep.state_hash, set())
                        idx = untried_first(d, taken, rules.act_on, rules.break_loops_max_drop) \
                            if rules.break_loops else d.action_index
                        if avoid:
                            risk = losses.risk(views[i].timestep, d.valid_actions, rules.known_loss_min_tries)
                            safer = avoid_losses(_rank(d, rules.act_on), idx, risk, rules.known_loss_rate,
                                                 d.valid_actions, taken if rules.break_loops else set(),
                                                 _allowed(d, idx, rules.break_loops_max_drop))
                            avoided += int(safer != idx)
                            idx = safer
                        d.action_index, d.action = idx, d.valid_actions[idx]
                        taken.add(d.action)
                steps = pool.step([d.action for d in decisions], indices=active)
                still = []
                for i, d, ts in zip(active, decisions, steps):
                    views[i].history.append((views[i].timestep.observation, d.action, float(ts.reward)))
                    views[i].timestep = ts
                    if not ts.done:
                        still.append(i)
                active = still
                bar.update(1)
            bar.close()
            for i in range(n):
                ts = views[i].timestep
                scores.append(ts.score)
                lengths.append(len(views[i].history))
                wins.append(float(ts.won))
                lines.append(_transcript(mode, episode_no, views[i]))
                episode_no += 1
        prefix = f"evals/{mode}"
        metrics[f"{prefix}/reward_mean"] = float(np.mean(scores))
        metrics[f"{prefix}/reward_max"] = float(np.max(scores))
        metrics[f"{prefix}/episode_length"] = float(np.mean(lengths))
        metrics[f"{prefix}/win_rate"] = float(np.mean(wins))
        if avoid:
            metrics[f"{prefix}/avoided_losses"] = avoided / rules.num_episodes
    main = modes[0]
    for key in ("reward_mean", "reward_max", "episode_length", "win_rate"):
        metrics[f"evals/{key}"] = metrics[f"evals/{main}/{key}"]
    metrics["evals/seconds"] = time.perf_counter() - t0
    return EvalResult(metrics=metrics, transcript="\n".join(lines))


def _transcript(mode: str, episode: int, view: EnvView) -> str:
    out = [f"=== {MODE_NAMES.get(mode, mode)} — episode {episode} ==="]
    for step, (obs, action, reward) in enumerate(view.history):
        out.append(f"[{step}] {obs.strip()}")
        out.append(f"> {action}" + (f"   (reward {reward:+g})" if reward else ""))
    ts = view.timestep
    out.append(f"[end] {ts.observation.strip()}")
    out.append(f"score {ts.score}, steps {len(view.history)}, won {ts.won}\n")
    return "\n".join(out)

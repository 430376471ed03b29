"""How well the LLM prior ranks the right move: walkthrough states of Jericho games, prior vs uniform.

Each game's walkthrough (Jericho's `get_walkthrough()`) is replayed from the start. At every state, the
walkthrough's move (e.g. `n`) is matched to the valid actions that reach the same world state (restore, step,
compare world-state hashes); states where none does are skipped. The prior scores the state's valid actions
exactly as search would (the configured prompt, history and scoring), and we count how often a matching action
is its top-1 and in its top-3, against what a uniform prior gets in expectation on the same states. The
walkthrough only measures: nothing here trains or prompts with it.

The last line is `ratio prior_top3_vs_uniform <top-3 rate / uniform top-3 rate>` over all games' states.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from priorzero_core.agent import kept_actions
from priorzero_core.config import GameConfig, PriorZeroConfig, config_from_dict, load_config
from priorzero_core.games import make_env
from priorzero_core.games.jericho_env import JerichoEnv
from priorzero_core.llm_prior import HistoryStep, LLMPrior, make_llm_prior

SUITE = Path(__file__).resolve().parents[1] / ".." / "shared" / "jericho-game-suite"


@dataclass
class ProbeState:
    """A walkthrough state: what the agent would see, and which valid actions do the walkthrough's move."""

    history: list[HistoryStep]
    observation: str
    valid_actions: list[str]
    matches: list[int]  # indices into valid_actions


def walkthrough_states(game: str, rom_dir: str, action_space_size: Optional[int], limit: int) -> list[ProbeState]:
    """The first `limit` walkthrough states (0: all) whose move matches a kept valid action."""
    cfg = GameConfig(name=game, rom_dir=rom_dir, max_episode_steps=10**6, action_space_size=action_space_size)
    env = make_env(cfg)  # seed None: Jericho's walkthrough seed, so the walkthrough replays exactly
    assert isinstance(env, JerichoEnv)
    try:
        ts = env.reset()
        moves = env.walkthrough() or []
        states: list[ProbeState] = []
        history: list[HistoryStep] = []
        for move in moves[:limit or None]:
            if ts.done:
                break
            valid = kept_actions(ts, env.spec.action_space_size)
            saved = env.get_state()
            target = env.advance(move).state_hash
            env.set_state(saved)
            matches = []
            for k, action in enumerate(valid):
                if env.advance(action).state_hash == target:
                    matches.append(k)
                env.set_state(saved)
            if matches:
                states.append(ProbeState(list(history), ts.observation, valid, matches))
            nxt = env.step(move)
            history.append((ts.observation, move, float(nxt.reward)))
            ts = nxt
        return states
    finally:
        env.close()


def uniform_hit_rates(state: ProbeState) -> tuple[float, float]:
    """Chance that a uniformly random ranking puts a matching action first, and among its first three."""
    n, m = len(state.valid_actions), len(state.matches)
    k = min(3, n)
    return m / n, 1 - math.comb(n - m, k) / math.comb(n, k)


@dataclass
class Quality:
    states: int
    top1: float
    top3: float
    uniform_top1: float
    uniform_top3: float
    nll: dict[float, float]  # temperature -> mean −log prior mass on the matching actions
    seconds: float

    @property
    def ratio(self) -> float:
        return self.top3 / self.uniform_top3


TEMPERATURES = (1.0, 2.0, 4.0, 8.0)  # the prior's NLL is reported at each (the ranking does not depend on it)


def measure(prior: LLMPrior, states: Sequence[ProbeState], batch: int = 4) -> Quality:
    t0 = time.perf_counter()
    requests = [(prior.build_prompt(s.history, s.observation, s.valid_actions), s.valid_actions) for s in states]
    scores = []
    for start in range(0, len(requests), batch):
        scores.extend(prior.score_actions(requests[start:start + batch]))
    seconds = time.perf_counter() - t0
    top1 = top3 = u1 = u3 = 0.0
    nll = dict.fromkeys(TEMPERATURES, 0.0)
    for state, s in zip(states, scores):
        order = np.argsort(-s.log_prior, kind="stable")
        top1 += order[0] in state.matches
        top3 += bool(set(order[:3].tolist()) & set(state.matches))
        a, b = uniform_hit_rates(state)
        u1, u3 = u1 + a, u3 + b
        for t in TEMPERATURES:
            lp = s.label_logprob / t - np.logaddexp.reduce(s.label_logprob / t)
            nll[t] -= float(np.logaddexp.reduce(lp[state.matches]))
    n = len(states)
    return Quality(n, top1 / n, top3 / n, u1 / n, u3 / n, {t: v / n for t, v in nll.items()}, seconds)


def uniform_nll(states: Sequence[ProbeState]) -> float:
    return float(np.mean([math.log(len(s.valid_actions) / len(s.matches)) for s in states]))


def pooled(results: Sequence[Quality]) -> Quality:
    n = sum(q.states for q in results)
    mean = lambda attr: sum(getattr(q, attr) * q.states for q in results) / n  # noqa: E731
    nll = {t: sum(q.nll[t] * q.states for q in results) / n for t in TEMPERATURES}
    return Quality(n, mean("top1"), mean("top3"), mean("uniform_top1"), mean("uniform_top3"), nll,
                   sum(q.seconds for q in results))


def load_prior(cfg: PriorZeroConfig, run_dir: Optional[Path]) -> LLMPrior:
    """The configured prior; with `run_dir`, with the LLM weights of that run's newest valid checkpoint."""
    prior = make_llm_prior(cfg.llm)
    if prior is None:
        raise SystemExit("llm.enabled is false: there is no prior to measure")
    if run_dir is not None:
        from priorzero_core import checkpoint as ckpt
        from priorzero_core.llm_train import LLMTrainer

        found = ckpt.latest_valid(run_dir / "checkpoints")
        if found is None or not (found[0] / "llm").is_dir():
            raise SystemExit(f"{run_dir} has no valid checkpoint with LLM weights")
        LLMTrainer(prior, cfg.llm, seed=cfg.run.seed).load_state(found[0] / "llm")
        print(f"LLM weights from {found[0]}")
    return prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", nargs="+", default=["zork1", "detective"], help="Jericho games (default: zork1 detective)")
    parser.add_argument("--states", type=int, default=100, help="walkthrough moves per game, from the start (0: all; default 100)")
    parser.add_argument("--rom-dir", default=os.environ.get("PRIORZERO_ROM_DIR", str(SUITE)),
                        help="folder with the ROMs (default: $PRIORZERO_ROM_DIR or ../shared/jericho-game-suite)")
    parser.add_argument("--run", type=Path, help="a run directory: measure the LLM of its newest checkpoint, with its config")
    parser.add_argument("--set", nargs="*", default=[], metavar="llm.KEY=VALUE", help="config overrides (e.g. llm.label_score=mean)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    cfg = load_config(args.run / "config.yaml", args.set) if args.run else config_from_dict({}, args.set)
    prior = load_prior(cfg, args.run)
    llm = cfg.llm
    print(f"prior: {llm.model}, label_score {llm.label_score} (length penalty {llm.label_length_penalty}), "
          f"history {llm.history_length}, valid actions in prompt {llm.prompt_valid_actions}, "
          f"temperature {llm.prior_temperature}")
    results, uniform = [], []
    nll_head = "".join(f"{f'NLL T={t:g}':>10}" for t in TEMPERATURES)
    print(f"{'game':<12}{'states':>7}{'top-1':>8}{'top-3':>8}{'uniform top-1':>15}{'uniform top-3':>15}"
          f"{'top-3 ratio':>13}{nll_head}{'NLL unif.':>10}{'s':>6}")

    def row(name: str, q: Quality, u: float) -> None:
        nll = "".join(f"{q.nll[t]:>10.2f}" for t in TEMPERATURES)
        print(f"{name:<12}{q.states:>7}{q.top1:>8.3f}{q.top3:>8.3f}{q.uniform_top1:>15.3f}{q.uniform_top3:>15.3f}"
              f"{q.ratio:>13.2f}{nll}{u:>10.2f}{q.seconds:>6.0f}")

    for game in args.games:
        states = walkthrough_states(game, args.rom_dir, None, args.states)
        results.append(measure(prior, states))
        uniform.append((uniform_nll(states), len(states)))
        row(game, results[-1], uniform[-1][0])
    total = pooled(results)
    row("all", total, sum(u * n for u, n in uniform) / sum(n for _, n in uniform))
    for game, q in zip(args.games, results):
        print(f"ratio prior_top3_vs_uniform_{game} {q.ratio:.2f}")
    print(f"ratio prior_top3_vs_uniform {total.ratio:.2f}")


if __name__ == "__main__":
    main()

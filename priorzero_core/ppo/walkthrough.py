"""A game's walkthrough as a segment with saved states and a search-like visit distribution.

PPO tests and benchmarks use it to get real game prompts without training an agent first.
"""

from __future__ import annotations

from ..config import GameConfig
from ..games import make_env
from ..replay import GameSegment, StepRecord
from .env_state import encode_state
from .reward import match_action

WALKTHROUGH_VISITS = 0.7  # visit share of the walkthrough's move, as a search guided by a good prior might give it


def walkthrough_segment(game_cfg: GameConfig, steps: int, fuzzy_cutoff: float = 0.85) -> GameSegment:
    """The first `steps` walkthrough moves; visits put WALKTHROUGH_VISITS on the matching valid action."""
    env = make_env(game_cfg.model_copy(update={"valid_action_workers": 0}))
    try:
        ts = env.reset()
        moves = (env.walkthrough() or [])[:steps]
        if not moves:
            raise ValueError(f"game {game_cfg.name} has no walkthrough")
        records = []
        for command in moves:
            state = encode_state(env.get_state())
            valid = list(ts.valid_actions)
            index = match_action(command, valid, fuzzy_cutoff)
            visits = [1.0 / len(valid)] * len(valid)
            if index >= 0 and len(valid) > 1:
                visits = [(1 - WALKTHROUGH_VISITS) / (len(valid) - 1)] * len(valid)
                visits[index] = WALKTHROUGH_VISITS
            nxt = env.step(command)
            records.append(StepRecord(observation=ts.observation, valid_actions=valid, action_index=max(index, 0),
                                      action=command, reward=nxt.reward, score=nxt.score, visit_dist=visits,
                                      root_value=0.0, terminal=nxt.done and not nxt.truncated,
                                      truncated=nxt.truncated, env_state=state))
            ts = nxt
            if ts.done:
                break
        return GameSegment(f"{game_cfg.name}-walkthrough", 0, 0, records)
    finally:
        env.close()

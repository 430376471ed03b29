"""PPO reward: parse `<answer>`, match it to a valid action, replay it in the real game, compare with MCTS.

reward = clip(game_reward_weight · Δscore + mcts_agreement_weight · visits[a] / max(visits), ±reward_clip),
or `invalid_action_penalty` when the answer is missing or matches no valid action.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import GameConfig, PPOConfig
from ..games import make_env
from ..games.base import GameEnv
from ..games.jericho_env import JerichoEnv
from .adapter import PromptRecord
from .env_state import decode_state

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_ARTICLES = {"the", "a", "an"}
# Interactive-fiction shorthands, so `n` matches `north` and `x lamp` matches `examine lamp`.
_SHORTHANDS = {
    "n": "north", "s": "south", "e": "east", "w": "west", "ne": "northeast", "nw": "northwest",
    "se": "southeast", "sw": "southwest", "u": "up", "d": "down", "l": "look", "i": "inventory",
    "x": "examine", "z": "wait", "g": "again", "get": "take", "grab": "take",
}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
REPLAY_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Judgement:
    """How one response scored; `action_index` is -1 when it named no valid action."""

    reward: float
    action_index: int
    game_reward: float
    agreement: float

    @property
    def valid(self) -> bool:
        return self.action_index >= 0


def parse_answer(text: str, finished: bool) -> Optional[str]:
    """The last `<answer>`'s content; an answer the model closed by ending its turn counts, a cut-off one does not."""
    start = text.rfind(_ANSWER_OPEN)
    if start < 0:
        return None
    rest = text[start + len(_ANSWER_OPEN):]
    end = rest.find(_ANSWER_CLOSE)
    if end < 0 and not finished:
        return None
    answer = (rest if end < 0 else rest[:end]).strip()
    return answer or None


def normalise_action(text: str) -> str:
    words = [w for w in _PUNCT.sub(" ", text.lower()).split() if w not in _ARTICLES]
    if words:
        words[0] = _SHORTHANDS.get(words[0], words[0])
    return " ".join(words)


def match_action(answer: str, valid_actions: Sequence[str], cutoff: float) -> int:
    """Index of the valid action `answer` names: exact, then normalised, then the closest above `cutoff`; else -1."""
    stripped = answer.strip()
    for i, action in enumerate(valid_actions):
        if action == stripped:
            return i
    wanted = normalise_action(answer)
    normalised = [normalise_action(a) for a in valid_actions]
    if wanted in normalised:
        return normalised.index(wanted)
    close = difflib.get_close_matches(wanted, normalised, n=1, cutoff=cutoff)
    return normalised.index(close[0]) if close else -1


def mcts_agreement(visit_dist: Sequence[float], index: int) -> float:
    """Visits of the chosen action relative to the most visited one: 1 for MCTS's favourite, 0 for unvisited."""
    top = max(visit_dist) if visit_dist else 0.0
    return float(visit_dist[index]) / top if top > 0 and index < len(visit_dist) else 0.0


class GameReplayer:
    """One env of the configured game that plays an action from a saved state and reports the reward."""

    def __init__(self, game_cfg: GameConfig):
        # Replays never need the next state's valid actions, so no search workers are started.
        self.env: GameEnv = make_env(game_cfg.model_copy(update={"valid_action_workers": 0}))
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()

    def reward(self, env_state: str, action: str) -> float:
        key = (env_state, action)
        if key not in self._cache:
            self.env.set_state(decode_state(env_state))
            # JerichoEnv.advance skips the valid-action search that step() would run for the new state.
            ts = self.env.advance(action) if isinstance(self.env, JerichoEnv) else self.env.step(action)
            self._cache[key] = float(ts.reward)
            while len(self._cache) > REPLAY_CACHE_SIZE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def close(self) -> None:
        self.env.close()


class RewardFunction:
    """Scores responses to prompt records; the game replay runs only when its weight is non-zero."""

    def __init__(self, cfg: PPOConfig, game_cfg: GameConfig):
        self.cfg = cfg
        self.replayer = GameReplayer(game_cfg) if cfg.game_reward_weight else None

    def judge(self, record: PromptRecord, response: str, finished: bool) -> Judgement:
        answer = parse_answer(record.prefill + response, finished)
        index = -1 if answer is None else match_action(answer, record.valid_actions, self.cfg.fuzzy_match_cutoff)
        if index < 0:
            return Judgement(self.cfg.invalid_action_penalty, -1, 0.0, 0.0)
        action = record.valid_actions[index]
        game = self.replayer.reward(record.env_state, action) if self.replayer else 0.0
        agreement = mcts_agreement(record.visit_dist, index)
        shaped = self.cfg.game_reward_weight * game + self.cfg.mcts_agreement_weight * agreement
        clip = self.cfg.reward_clip
        return Judgement(min(max(shaped, -clip), clip), index, game, agreement)

    def judge_batch(self, records: Sequence[PromptRecord], responses: Sequence[str], finished: Sequence[bool]) -> list[Judgement]:
        return [self.judge(r, text, done) for r, text, done in zip(records, responses, finished)]

    def close(self) -> None:
        if self.replayer is not None:
            self.replayer.close()

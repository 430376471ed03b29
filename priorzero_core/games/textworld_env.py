"""The embedded default game: a seeded TextWorld game generated once, cached on disk, played via TextWorld."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jericho
import textworld
from textworld import EnvInfos, GameOptions
from textworld.challenges.tw_simple import simple as tw_simple

from ..config import CACHE_ROOT_ENV, cache_root
from ..errors import GameError
from .base import GameEnv, GameSpec, TimeStep, agent_view

# tw-simple: a six-room house, quest of 12 commands (door, key, food, stove), a point per sub-goal.
_SETTINGS = {"rewards": "dense", "goal": "detailed", "test": False}
_VERSION = "tw-simple-v1"  # bump when the generator settings change, so old caches are not reused
_INFOS = EnvInfos(
    admissible_commands=True, score=True, max_score=True, won=True, lost=True,
    description=True, inventory=True, facts=True,
)
# TextWorld admits commands that only show something; Jericho's valid actions are the commands that change the
# world, so these are left out here too (every observation already holds the room's description and inventory).
OBSERVE_VERBS = frozenset({"look", "inventory", "examine"})
_PROMPT_LINE = re.compile(r"\n>[^\n]*$")  # the trailing prompt and status bar TextWorld appends
_ART_LINE = re.compile(r"^[^A-Za-z0-9]*$")  # the ASCII-art title opening the game: noise in a prompt


@dataclass(frozen=True)
class EmbeddedGame:
    """A generated game file with the facts the catalog needs without loading it."""

    path: Path
    max_score: int
    walkthrough: list[str]


def _clean(feedback: str) -> str:
    lines = _PROMPT_LINE.sub("", feedback).splitlines()
    while lines and _ART_LINE.match(lines[0]):
        lines.pop(0)
    return "\n".join(lines).strip()


def games_cache_dir() -> Path:
    return cache_root() / "games"


def _generate(seed: int, folder: Path) -> None:
    options = GameOptions()
    options.seeds = seed
    options.path = str(folder / "game.z8")
    options.force_recompile = True
    game = tw_simple.make(_SETTINGS, options)
    textworld.generator.compile_game(game, options)
    meta = {"seed": seed, "max_score": int(game.max_score), "walkthrough": list(game.walkthrough)}
    (folder / "meta.json").write_text(json.dumps(meta))


def embedded_game(seed: int, cache_dir: Optional[Path] = None) -> EmbeddedGame:
    """The game for `seed`, generated on first use (a few seconds) and reused from the cache after."""
    root = cache_dir or games_cache_dir()
    folder = root / f"embedded-{_VERSION}-seed{seed}"
    if not (folder / "meta.json").is_file():
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        except OSError as err:
            raise GameError(f"cannot write the embedded game to {root} ({err.strerror}); set ${CACHE_ROOT_ENV}") from None
        try:
            _generate(seed, tmp)
            # Another process may have finished first: renaming onto its folder fails and we keep theirs.
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((folder / "meta.json").read_text())
    return EmbeddedGame(folder / "game.z8", meta["max_score"], meta["walkthrough"])


class TextWorldEnv(GameEnv):
    """A TextWorld game; valid actions are its admissible commands (sorted, then truncated).

    TextWorld environments cannot export a picklable state, so `get_state` is the command history since
    reset and `set_state` resets and replays it (the game is deterministic; ~10 ms a replayed step).
    """

    def __init__(self, spec: GameSpec, walkthrough: Optional[list[str]] = None):
        super().__init__(spec)
        self._walkthrough = walkthrough
        with warnings.catch_warnings():
            # Jericho warns it cannot track score in generated games; TextWorld's own state tracking does.
            warnings.simplefilter("ignore", jericho.UnsupportedGameWarning)
            self._env = textworld.start(str(spec.path), request_infos=_INFOS)
        self._history: list[str] = []

    def reset(self, seed: Optional[int] = None) -> TimeStep:
        """Start over; `seed` is ignored because the generated game is deterministic."""
        self._history = []
        state = self._env.reset()
        self.last = self._timestep(state, state["score"])
        return self.last

    def step(self, action: str) -> TimeStep:
        prev_score = self.last.score if self.last else 0
        state, _, _ = self._env.step(action)
        self._history.append(action)
        self.last = self._timestep(state, prev_score)
        return self.last

    def _timestep(self, state: Any, prev_score: int) -> TimeStep:
        raw = _clean(state.feedback)
        score = int(state["score"])
        over = bool(state["won"] or state["lost"])
        truncated = not over and len(self._history) >= self.max_episode_steps
        facts = "\n".join(sorted(map(str, state["facts"])))
        limit = self.spec.action_space_size
        info: dict[str, Any] = {"truncated_reason": "max_episode_steps"} if truncated else {}
        return TimeStep(
            observation=agent_view(raw, state["description"], state["inventory"]),
            raw=raw,
            score=score,
            reward=float(score - prev_score),
            done=over or truncated,
            moves=len(self._history),
            valid_actions=[c for c in state["admissible_commands"] if c.split()[0] not in OBSERVE_VERBS][: limit],
            state_hash=hashlib.md5(facts.encode()).hexdigest(),
            won=bool(state["won"]),
            truncated=truncated,
            info=info,
        )

    def get_state(self) -> tuple[str, ...]:
        return tuple(self._history)

    def set_state(self, state: tuple[str, ...]) -> None:
        self.reset()
        for action in state:
            self.step(action)

    def walkthrough(self) -> Optional[list[str]]:
        return list(self._walkthrough) if self._walkthrough else None

    def close(self) -> None:
        self._env.close()

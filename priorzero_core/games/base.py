"""One interface for every game backend (Jericho ROMs, the embedded TextWorld game)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class GameSpec:
    """A resolved game: what to load and the sizes an episode uses."""

    name: str
    backend: Literal["jericho", "textworld"]
    path: Path  # the Jericho ROM, or the generated TextWorld game file
    max_score: int
    action_space_size: int  # valid actions kept per step, in the game's order
    max_episode_steps: int


@dataclass
class TimeStep:
    """What the agent sees after reset or step."""

    observation: str  # agent view: last response + look + inventory
    raw: str  # the game's own response to the last command
    score: int
    reward: float
    done: bool
    moves: int
    valid_actions: list[str]
    state_hash: str
    won: bool = False
    truncated: bool = False  # done because of a step limit or a stuck interpreter, not the game's end
    info: dict[str, Any] = field(default_factory=dict)


def agent_view(response: str, look: str, inventory: str) -> str:
    """The observation every backend shows the agent: response + look + inventory (as LightZero does)."""
    return "\n\n".join(part.strip() for part in (response, look, inventory) if part.strip())


class GameEnv(abc.ABC):
    """A text game. `step` returns valid actions for the new state (computed lazily by `EnvPool`)."""

    last: Optional[TimeStep] = None  # the latest TimeStep, after reset, step or set_state

    def __init__(self, spec: GameSpec):
        self.spec = spec
        self.name = spec.name
        self.max_score = spec.max_score
        self.max_episode_steps = spec.max_episode_steps

    @abc.abstractmethod
    def reset(self, seed: Optional[int] = None) -> TimeStep: ...

    @abc.abstractmethod
    def step(self, action: str) -> TimeStep: ...

    @abc.abstractmethod
    def get_state(self) -> Any:
        """An opaque, picklable snapshot that `set_state` restores (also in another process)."""

    @abc.abstractmethod
    def set_state(self, state: Any) -> None: ...

    def cell_key(self) -> str:
        """The Go-Explore cell of the current state: states that exploration treats as one place to return to.
        By default the score and the exact world state (fine for small games)."""
        assert self.last is not None, "reset() first"
        return f"{self.last.score}|{self.last.state_hash}"

    def walkthrough(self) -> Optional[list[str]]:
        """A known winning command sequence, when the game has one."""
        return None

    def close(self) -> None:
        pass

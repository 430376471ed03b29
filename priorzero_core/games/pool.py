"""N envs of one game stepped together; Jericho valid actions for all new states come from one parallel batch."""

from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator, Optional, Sequence, cast

from ..config import GameConfig
from ..errors import StageStopped
from .base import GameEnv, GameSpec, TimeStep
from .catalog import game_spec
from .jericho_env import JerichoEnv
from .textworld_env import TextWorldEnv, embedded_game
from .valid_actions import Request, ValidActions


def valid_actions_for(spec: GameSpec, game_cfg: GameConfig) -> ValidActions:
    """The cached, parallel valid-action search for a Jericho game, sized by the config."""
    return ValidActions(
        spec.path,
        workers=game_cfg.valid_action_workers,
        timeout_s=game_cfg.valid_action_timeout_s,
        cache_size=game_cfg.valid_action_cache_size,
    )


def _build(spec: GameSpec, game_cfg: GameConfig, seed: Optional[int], valid_actions: Optional[ValidActions]) -> GameEnv:
    if spec.backend == "textworld":
        return TextWorldEnv(spec, walkthrough=embedded_game(game_cfg.embedded_seed).walkthrough)
    owned = valid_actions is None
    return JerichoEnv(spec, valid_actions or valid_actions_for(spec, game_cfg), seed=seed, owns_valid_actions=owned)


def make_env(game_cfg: GameConfig, seed: Optional[int] = None) -> GameEnv:
    """One env of the configured game; a Jericho env gets its own valid-action workers, stopped by close()."""
    return _build(game_spec(game_cfg), game_cfg, seed, None)


class EnvPool:
    """`n` envs of one game; env i is seeded `seed + i` (Jericho's RNG; the embedded game is deterministic)."""

    def __init__(self, game_cfg: GameConfig, n: int, seed: int = 0, valid_actions: Optional[ValidActions] = None,
                 stop: Optional[threading.Event] = None):
        """`valid_actions`: another pool's (its workers and cache are shared; that pool closes them). `stop`: once
        set, every reset and step raises StageStopped instead of playing (its owner is about to close the pool)."""
        self.stop = stop
        self.spec = game_spec(game_cfg)
        self._owns_valid_actions = valid_actions is None
        if valid_actions is None and self.spec.backend == "jericho":
            valid_actions = valid_actions_for(self.spec, game_cfg)
        self.valid_actions = valid_actions if self.spec.backend == "jericho" else None
        self.envs: list[GameEnv] = [_build(self.spec, game_cfg, seed + i, self.valid_actions) for i in range(n)]

    @property
    def size(self) -> int:
        return len(self.envs)

    def reset_all(self) -> list[TimeStep]:
        return self.reset(range(self.size))

    def reset(self, indices: Sequence[int]) -> list[TimeStep]:
        """Start new episodes in the envs at `indices`; TimeSteps in that order."""
        indices = list(indices)
        self._check_stop()
        if self.valid_actions is None:
            return [self.envs[i].reset() for i in indices]
        return self._with_valid_actions(indices, (self._jericho(i).restart() for i in indices))

    def step(self, actions: Sequence[Optional[str]], indices: Optional[Sequence[int]] = None) -> list[TimeStep]:
        """Play `actions[k]` in env `indices[k]` (default: all envs); a None action leaves that env as it is."""
        indices = list(range(self.size)) if indices is None else list(indices)
        if len(actions) != len(indices):
            raise ValueError(f"{len(actions)} actions for {len(indices)} envs")
        self._check_stop()
        moving = [(i, a) for i, a in zip(indices, actions) if a is not None]
        if self.valid_actions is None:
            stepped = [self.envs[i].step(a) for i, a in moving]
        else:
            stepped = self._with_valid_actions([i for i, _ in moving], (self._jericho(i).advance(a) for i, a in moving))
        new = dict(zip((i for i, _ in moving), stepped))
        return [new[i] if i in new else cast(TimeStep, self.envs[i].last) for i in indices]

    def _with_valid_actions(self, indices: list[int], steps: Iterable[TimeStep]) -> list[TimeStep]:
        """Attach valid actions to `steps`, taken lazily: each env steps inside the request generator, so the
        workers start on a new state while the next env steps."""
        assert self.valid_actions is not None
        taken: list[TimeStep] = []
        live: list[tuple[int, TimeStep]] = []

        def requests() -> Iterator[Request]:
            for i, ts in zip(indices, steps):
                taken.append(ts)
                if not ts.done:
                    live.append((i, ts))
                    yield self._jericho(i).valid_action_request()

        answers = self.valid_actions.batch(requests())
        attached = {i: self._jericho(i).attach(ts, actions) for (i, ts), actions in zip(live, answers)}
        return [attached.get(i, ts) for i, ts in zip(indices, taken)]

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise StageStopped("the env pool is closing")

    def _jericho(self, i: int) -> JerichoEnv:
        return cast(JerichoEnv, self.envs[i])

    def get_state(self, i: int) -> Any:
        return self.envs[i].get_state()

    def set_state(self, i: int, state: Any) -> TimeStep:
        """Restore env i to a `get_state` snapshot; returns its TimeStep there (valid actions included)."""
        self.envs[i].set_state(state)
        return cast(TimeStep, self.envs[i].last)

    def cell_key(self, i: int) -> str:
        return self.envs[i].cell_key()

    def close(self) -> None:
        for env in self.envs:
            env.close()
        if self.valid_actions is not None and self._owns_valid_actions:
            self.valid_actions.close()

"""Jericho (Z-machine) games: exact score and reward, look/inventory without advancing, cached valid actions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import jericho
import numpy as np

from .base import GameEnv, GameSpec, TimeStep, agent_view
from .valid_actions import Request, ValidActions

# When the search finds nothing in a live state the agent still needs a move: "wait" passes a turn so timed
# events can unfold (being carried, a closing door), whereas "look" never changes the state and would loop.
FALLBACK_ACTIONS = ["wait"]

_NAME = slice(jericho.ZObject._name.offset, jericho.ZObject._name.offset + jericho.ZObject._name.size)


def world_state_hash(env: jericho.FrotzEnv) -> str:
    """What `FrotzEnv.get_world_state_hash` hashes (cleaned object tree + special RAM), from the raw bytes.

    Jericho formats every object as a string first, ~6 ms a step; this distinguishes the same states in ~0.1 ms.
    """
    objs = env.get_world_objects(clean=True)
    rows = np.frombuffer(objs, dtype=np.uint8).reshape(len(objs), -1).copy()
    names = rows[:, _NAME]
    names[np.cumsum(names == 0, axis=1) > 0] = 0  # bytes after a name's terminator are leftovers, not state
    return hashlib.md5(rows.tobytes() + env._get_special_ram().tobytes()).hexdigest()


@dataclass(frozen=True)
class JerichoState:
    """A picklable snapshot: the interpreter's state plus this env's step count and last TimeStep."""

    frotz: tuple
    steps: int
    last: Optional[TimeStep]


class JerichoEnv(GameEnv):
    """One Jericho game. `advance` + `attach` split a step so `EnvPool` can batch the valid-action search."""

    def __init__(self, spec: GameSpec, valid_actions: ValidActions, seed: Optional[int] = None,
                 owns_valid_actions: bool = False):
        super().__init__(spec)
        self.valid_actions = valid_actions
        self._owns_valid_actions = owns_valid_actions
        # seed None uses the walkthrough's seed from Jericho's bindings, so walkthrough() replays exactly.
        self._env = jericho.FrotzEnv(str(spec.path), seed=seed)
        self._steps = 0

    def reset(self, seed: Optional[int] = None) -> TimeStep:
        return self._complete(self.restart(seed))

    def step(self, action: str) -> TimeStep:
        return self._complete(self.advance(action))

    def restart(self, seed: Optional[int] = None) -> TimeStep:
        """Like `reset`, but the TimeStep has no valid actions yet."""
        if seed is not None:
            self._env.seed(seed)
        raw, _ = self._env.reset()
        self._steps = 0
        self.last = None
        return self._observe(raw)

    def advance(self, action: str) -> TimeStep:
        """Play `action`; the TimeStep has no valid actions yet (see `valid_action_request` and `attach`)."""
        raw, _, _, _ = self._env.step(action)
        self._steps += 1
        return self._observe(raw)

    def valid_action_request(self) -> Request:
        """The (world-state hash, interpreter state) that `ValidActions` answers for the current state."""
        assert self.last is not None, "reset() first"
        return self.last.state_hash, self._env.get_state()

    def attach(self, ts: TimeStep, actions: Optional[list[str]]) -> TimeStep:
        """Give `ts` its valid actions; None (the search timed out) ends the episode as truncated."""
        if actions is None:
            ts = replace(ts, done=True, truncated=True, info={**ts.info, "truncated_reason": "valid_actions_timeout"})
        else:
            ts = replace(ts, valid_actions=(actions or FALLBACK_ACTIONS)[: self.spec.action_space_size])
        self.last = ts
        return ts

    def _complete(self, ts: TimeStep) -> TimeStep:
        if ts.done:
            return ts
        return self.attach(ts, self.valid_actions.get(*self.valid_action_request()))

    def _observe(self, raw: str) -> TimeStep:
        over = self._env.victory() or self._env.game_over()
        truncated = not over and self._steps >= self.max_episode_steps
        score = self._env.get_score()
        prev_score = self.last.score if self.last else score
        look, inventory = ("", "") if over else self._look_and_inventory()
        info: dict[str, Any] = {"game_moves": self._env.get_moves()}
        if truncated:
            info["truncated_reason"] = "max_episode_steps"
        ts = TimeStep(
            observation=agent_view(raw, look, inventory),
            raw=raw.strip(),
            score=score,
            reward=float(score - prev_score),
            done=over or truncated,
            moves=self._steps,
            valid_actions=[],
            state_hash=world_state_hash(self._env),
            won=self._env.victory(),
            truncated=truncated,
            info=info,
        )
        self.last = ts
        return ts

    def _look_and_inventory(self) -> tuple[str, str]:
        """Run `look` and `inventory` from a saved state and restore it, so the game does not advance."""
        saved = self._env.get_state()
        look = self._env.step("look")[0]
        self._env.set_state(saved)
        inventory = self._env.step("inventory")[0]
        self._env.set_state(saved)
        return look, inventory

    def cell_key(self) -> str:
        """Score, room, what the player carries and which commands do something here: coarser than the world
        state (which every moved object or wandering character changes), fine enough to tell a revealed trap
        door or an unlocked passage from the same room before."""
        assert self.last is not None, "reset() first"
        location = self._env.get_player_location()
        carried = sorted(obj.num for obj in self._env.get_inventory())
        actions = hashlib.md5("|".join(sorted(self.last.valid_actions)).encode()).hexdigest()[:12]
        return f"{self.last.score}|{location.num if location else -1}|{','.join(map(str, carried))}|{actions}"

    def get_state(self) -> JerichoState:
        return JerichoState(self._env.get_state(), self._steps, self.last)

    def set_state(self, state: JerichoState) -> None:
        self._env.set_state(state.frotz)
        self._steps = state.steps
        self.last = state.last

    def walkthrough(self) -> Optional[list[str]]:
        """Jericho's walkthrough; it wins when the env was built with the default seed (None)."""
        return self._env.get_walkthrough() or None

    def close(self) -> None:
        if self._owns_valid_actions:
            self.valid_actions.close()
        self._env.close()


class SeedReplayer:
    """Plays a command sequence from a Jericho game's start under other game seeds than the one it was found
    on. A random event (a monster in the dark, a thief, a fight) that spared one seed need not spare another:
    the scores tell a trajectory that holds from one that was lucky. No valid actions are computed, so a
    replay costs little (≈ 0.01 ms a Zork step)."""

    def __init__(self, path, seeds: list[int]):
        self.envs = [jericho.FrotzEnv(str(path), seed=seed) for seed in seeds]

    def scores(self, actions: list[str]) -> list[float]:
        """Per seed, the score after playing `actions` from the start (or where the game ended on the way)."""
        return [held for held, _ in self.outcomes(actions)]

    def outcomes(self, actions: list[str], probes: Sequence[str] = ()) -> list[tuple[float, float]]:
        """Per seed, what `actions` hold one move after their end: (the score less what one more move, drawn
        uniformly from `probes`, would lose on average; the share of `probes` that leave the game going or won).
        A trajectory whose end lies one step from likely death (the dark with no light) holds less than its
        score; without `probes`, (the score, 1). A seed where the game ended on the way: (its score there,
        1 if won else 0)."""
        out = []
        for env in self.envs:
            env.reset()
            done = False
            for action in actions:
                if env.step(action)[2]:
                    done = True
                    break
            score = float(env.get_score())
            if done or not probes:
                out.append((score, float(env.victory()) if done else 1.0))
                continue
            end, lost, safe = env.get_state(), 0.0, 0
            for probe in probes:
                env.set_state(end)
                over = env.step(probe)[2]
                lost += max(0.0, score - float(env.get_score()))
                safe += not over or env.victory()
            out.append((score - lost / len(probes), safe / len(probes)))
        return out

    def close(self) -> None:
        for env in self.envs:
            env.close()


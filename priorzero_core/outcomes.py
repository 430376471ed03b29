"""Which moves ended the game in a loss, and where: counted over the run's collection and search-free exploration
steps (not the steps that record a shortened demonstration, nor PPO's rollouts, nor evaluation), for the greedy
agent to avoid the moves its own experience saw lose (`eval.avoid_known_losses`).

A move is counted under two keys of the state it was taken in: the *place*, the observation without the game's
response to the previous move (what `look` and `inventory` show), and the *room*, the place's first line (the
location's name, or the one line a game shows for all its dark places). A move's loss rate is read from the
place where it has been tried `min_tries` times, else from the room, else it is unknown (never avoided): the room
generalises over what the player carries and what lies about (a move into a pit kills whatever is in hand), the
place tells apart what the room mixes (a door that kills the unarmed only). Where `look` itself passes a turn,
what happens meanwhile (a thief passing by) is part of the place, so such places fall back to the room more often.
Only the game's own ends count: a step limit or an exploration budget running out is no loss.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np

from .games.base import TimeStep

Counts = dict[tuple[str, str], list[int]]  # (key, action) -> [tries, losses]
CHECKPOINT_NAME = "losses"  # the counts in a checkpoint and an exported agent: losses.json.gz


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).hexdigest()


def place_keys(ts: TimeStep) -> tuple[str, str]:
    """(place key, room key) of the state `ts` shows: its observation without the response to the last move, and
    that place's first line."""
    obs, response = ts.observation.strip(), ts.raw.strip()
    place = obs[len(response):].strip() if response and obs.startswith(response) else obs
    room = next((line.strip() for line in place.splitlines() if line.strip()), "")
    return "p" + _digest(place), "r" + _digest(room)


def record(counts: Counts, ts: TimeStep, action: str, lost: bool) -> None:
    """Count `action` taken in the state `ts` shows, and whether it ended the game in a loss."""
    for key in place_keys(ts):
        entry = counts.setdefault((key, action), [0, 0])
        entry[0] += 1
        entry[1] += int(lost)


def merge(into: Counts, counts: Counts) -> None:
    for key, (tries, lost) in counts.items():
        entry = into.setdefault(key, [0, 0])
        entry[0] += tries
        entry[1] += lost


class LossMemory:
    """A run's counts of moves and the losses they led to (see the module docstring)."""

    def __init__(self, counts: Optional[Counts] = None):
        self.counts: Counts = counts if counts is not None else {}

    def add(self, counts: Counts) -> None:
        merge(self.counts, counts)

    def risk(self, ts: TimeStep, actions: Sequence[str], min_tries: int) -> np.ndarray:
        """Each action's known loss rate in the state `ts` shows (0 where it is unknown)."""
        place, room = place_keys(ts)
        out = np.zeros(len(actions))
        for i, action in enumerate(actions):
            for key in (place, room):
                tries, lost = self.counts.get((key, action), (0, 0))
                if tries >= min_tries:
                    out[i] = lost / tries
                    break
        return out

    def losing_moves(self) -> int:
        """How many (place, move) pairs have lost the game at least once."""
        return sum(1 for (key, _), (_, lost) in self.counts.items() if lost and key.startswith("p"))

    def to_json(self) -> list[list[Any]]:
        return [[key, action, tries, lost] for (key, action), (tries, lost) in sorted(self.counts.items())]

    @classmethod
    def from_json(cls, rows: list[list[Any]]) -> "LossMemory":
        return cls({(str(key), str(action)): [int(tries), int(lost)] for key, action, tries, lost in rows})


def avoid_losses(rank: np.ndarray, chosen: int, risk: np.ndarray, max_rate: float, actions: Sequence[str],
                 tried: set[str], allowed: Optional[np.ndarray] = None) -> int:
    """`chosen` unless its known loss rate reaches `max_rate`: then the best-ranked move (by `rank`) below that
    rate, preferring one `allowed` (the loop rule's Q bound, eval.break_loops_max_drop) and then one not yet
    `tried` in this state; when every move reaches it, the least risky (`chosen` where it is among them)."""
    if risk[chosen] < max_rate:
        return chosen
    order = np.argsort(-rank, kind="stable")
    safe = risk < max_rate
    ok = np.ones(len(rank), dtype=bool) if allowed is None else allowed
    untried = np.array([a not in tried for a in actions], dtype=bool)
    for keep in (safe & ok & untried, safe & ok, safe & untried, safe):
        for idx in order:
            if keep[idx]:
                return int(idx)
    if risk[chosen] <= risk.min():
        return chosen
    return int(order[np.argmin(risk[order])])

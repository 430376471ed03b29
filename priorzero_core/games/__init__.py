"""Text games behind one interface: Jericho ROMs and the embedded TextWorld game."""

from .base import GameEnv, GameSpec, TimeStep
from .catalog import GameRow, game_spec, list_games, resolve_rom, supported_games
from .pool import EnvPool, make_env

__all__ = [
    "EnvPool",
    "GameEnv",
    "GameRow",
    "GameSpec",
    "TimeStep",
    "game_spec",
    "list_games",
    "make_env",
    "resolve_rom",
    "supported_games",
]

"""What a training run needs before it starts, checked in one place: the CLI calls it before Prefect starts (a
one-line error, no traceback), and the flow calls it again first thing, whatever started it (a deployment run
from the UI or a worker)."""

from __future__ import annotations

from .config import PriorZeroConfig


def check_inputs(cfg: PriorZeroConfig) -> None:
    """The game's ROM and a user-given LLM exist and can be read; raises ConfigError (or its kin) otherwise."""
    from .games.catalog import EMBEDDED, resolve_rom
    from .llm_prior import check_model

    if cfg.game.name != EMBEDDED:
        resolve_rom(cfg.game)
    if cfg.llm.enabled:
        check_model(cfg.llm)

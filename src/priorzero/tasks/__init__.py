"""Prefect tasks wrapping the PriorZero Trainer stages, and MLflow tracking for flow runs."""

from .stages import close_trainer, configured_stages, open_trainer, skipped, trainer_for
from .tracking import Tracker

__all__ = ["Tracker", "close_trainer", "configured_stages", "open_trainer", "skipped", "trainer_for"]

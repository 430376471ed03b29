"""ORZ-style PPO for the LLM on Ray: segments → prompts → rollouts → rewards from the game → PPO/GRPO updates."""

from .adapter import GameSegmentToORZAdapter, PromptRecord, TrainingData, read_prompts, write_prompts
from .env_state import decode_state, encode_state
from .trainer import PPOTrainer, orz_enabled

__all__ = [
    "GameSegmentToORZAdapter",
    "PPOTrainer",
    "PromptRecord",
    "TrainingData",
    "decode_state",
    "encode_state",
    "orz_enabled",
    "read_prompts",
    "write_prompts",
]

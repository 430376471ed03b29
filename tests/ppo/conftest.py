"""PPO test helpers: the tiny-model config."""

import pytest

from priorzero_core.config import PriorZeroConfig


@pytest.fixture
def tiny_ppo_config(tiny_llm_dir, rom_dir):
    """Build the tiny LM on Zork 1 with sizes that make one PPO step take seconds; keyword args override `ppo`."""

    def build(**ppo) -> PriorZeroConfig:
        settings = dict(rollout_batch_size=3, train_batch_size=3, n_samples_per_prompt=2, critic_update_steps=2,
                        generate_max_tokens=8, max_prompt_tokens=256, history_length=1, think=False, actor_num_cpus=0.5)
        settings.update(ppo)
        return PriorZeroConfig.model_validate({
            "game": {"name": "zork1", "rom_dir": str(rom_dir)},
            "llm": {"model": str(tiny_llm_dir)},
            "ppo": settings,
        })

    return build

"""SmolLM2-135M on real Zork 1 prompts in a local Ray cluster: a few updates must raise the reward."""

import math

import numpy as np
import pytest
import torch

from priorzero_core.config import LLMConfig, PriorZeroConfig
from priorzero_core.llm_prior import make_llm_prior
from priorzero_core.ppo import PPOTrainer
from priorzero_core.replay import GameSegment

STEPS = 4


def smollm_config(rom_dir, algorithm: str) -> PriorZeroConfig:
    """Short answer-only prompts so one update takes about a minute on two CPU cores."""
    return PriorZeroConfig.model_validate({
        "game": {"name": "zork1", "rom_dir": str(rom_dir)},
        "llm": {"backend": "transformers"},
        # GRPO collapsed here with six minibatches per rollout at this learning rate; three larger ones learn.
        "ppo": dict(algorithm=algorithm, rollout_batch_size=4, n_samples_per_prompt=6,
                    train_batch_size=8 if algorithm == "grpo" else 4,
                    critic_update_steps=1, generate_max_tokens=10, max_prompt_tokens=128, history_length=0, think=False,
                    temperature=0.7, actor_lr=3e-5, critic_lr=1.5e-4, kl_coef=0.0, game_reward_weight=0.1,
                    gradient_checkpointing=False),
    })


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_updates_raise_the_share_of_valid_mcts_agreeing_answers(algorithm, rom_dir, zork_segment, tmp_path):
    segment = GameSegment("zork", 0, 0, [zork_segment.steps[i] for i in (0, 2, 3, 7)])
    cfg = smollm_config(rom_dir, algorithm)
    with PPOTrainer(cfg, tmp_path / "run") as trainer:
        prompts = trainer.adapt([segment])
        before = trainer.evaluate(prompts, samples_per_prompt=8)
        history = [trainer.train(prompts) for _ in range(STEPS)]
        after = trainer.evaluate(prompts, samples_per_prompt=8)
        print(f"{algorithm}: before {before} after {after}")

        assert all(math.isfinite(h["train/ppo_kl"]) for h in history)
        assert after["eval/ppo_reward_mean"] > before["eval/ppo_reward_mean"] + 0.15
        assert after["eval/ppo_valid_rate"] > before["eval/ppo_valid_rate"]

        # The MCTS prior scores with the weights PPO trained once they are synced into its module.
        prior = make_llm_prior(LLMConfig(backend="transformers"))
        step = segment.steps[2]
        request = [(prior.build_prompt([], step.observation, step.valid_actions), step.valid_actions)]
        untrained = prior.score(request)[0]
        trainer.sync_to(prior.trainable_model())
        trained = trainer.policy_state_dict()
        assert all(torch.equal(prior.trainable_model().state_dict()[k], v) for k, v in trained.items())
        assert not np.allclose(prior.score(request)[0], untrained)

"""A Ray actor killed mid-run (OOM killer, a lost node): the PPO stage fails once, then its retry runs on new actors.

Real local Ray cluster, tiny random LLM with SmolLM2's tokenizer, the embedded game. The policy actor's process
is SIGKILLed between two PPO stages; the next `ppo_train` raises Ray's actor error, stops what is left of the
old actors, and the retry starts a fresh set that trains. Nothing is left running at the end.
"""

import os
import signal

import pytest

from priorzero_core.config import load_config
from priorzero_core.trainer import Trainer

from .test_crash_resume import PPO_OVERRIDES


def test_a_killed_policy_actor_fails_one_ppo_stage_and_the_retry_trains_on_new_actors(tiny_llm_dir, tmp_path,
                                                                                      process_tracker):
    import ray

    children, still_running = process_tracker
    before = children()
    cfg = load_config("debug", [*PPO_OVERRIDES, f"llm.model={tiny_llm_dir}", "schedule.llm_train_freq=1",
                                "collect.steps_per_iteration=5", "collect.num_envs=1", "mcts.num_simulations=2"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    spawned: set[int] = set()
    try:
        trainer.collect(1)
        prompts = trainer.adapt(1).artifacts["prompts"]
        assert "train/ppo_reward_mean" in trainer.ppo_train(1, prompts).metrics
        spawned |= children() - before
        old = trainer.ppo
        pid = ray.get(old.policy.actors[0].__ray_call__.remote(lambda actor: os.getpid()))
        os.kill(pid, signal.SIGKILL)

        with pytest.raises(ray.exceptions.RayActorError):
            trainer.ppo_train(1, prompts)
        assert trainer._ppo is None  # the broken actor set is gone, not reused

        retried = trainer.ppo_train(1, prompts)
        assert trainer.ppo is not old and retried.metrics["train/ppo_response_len"] > 0
        spawned |= children() - before
    finally:
        trainer.close()
    leaked = still_running(spawned)
    assert not leaked, f"still running after close(): {[p.name() for p in leaked]}"

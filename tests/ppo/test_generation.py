import pytest

from priorzero_core.config import LLMConfig, PPOConfig
from priorzero_core.errors import BackendUnavailable
from priorzero_core.llm_prior import load_tokenizer, resolve_model_dir
from priorzero_core.ppo.generation import PolicyEngine, make_engine, trim_response


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir(LLMConfig()))


def test_responses_end_at_the_stop_string_or_eos(tokenizer):
    stop = tokenizer.encode(" north </answer>", add_special_tokens=False)
    ids, finished = trim_response(tokenizer, stop + [tokenizer.eos_token_id] * 3)  # generate pads with EOS
    assert ids == stop and finished
    ids, finished = trim_response(tokenizer, tokenizer.encode(" wait", add_special_tokens=False) + [tokenizer.eos_token_id, 5])
    assert ids[-1] == tokenizer.eos_token_id and finished
    capped = tokenizer.encode(" open the", add_special_tokens=False)
    assert trim_response(tokenizer, capped) == (capped, False)


def test_cpu_default_generates_in_the_policy_actor(tmp_path, tokenizer):
    cfg = PPOConfig(vllm_venv=str(tmp_path / "no-venv"))
    assert isinstance(make_engine(cfg, object(), tmp_path, tokenizer, tmp_path), PolicyEngine)


def test_vllm_asked_for_but_missing_is_a_clear_error(tmp_path, tokenizer):
    cfg = PPOConfig(generation_backend="vllm", vllm_venv=str(tmp_path / "no-venv"))
    with pytest.raises(BackendUnavailable, match="setup_vllm_cpu.sh"):
        make_engine(cfg, object(), tmp_path, tokenizer, tmp_path)


def test_which_engine_generates(tmp_path, monkeypatch):
    import importlib.util

    from priorzero_core.ppo import generation

    none = str(tmp_path / "no-venv")
    assert generation.engine_kind(PPOConfig(vllm_venv=none)) == "transformers"  # a CPU without vLLM
    assert generation.engine_kind(PPOConfig(vllm_venv=none, generation_backend="vllm")) == "server"  # the venv's
    assert generation.engine_kind(PPOConfig(vllm_venv=none, generation_backend="vllm", vllm_engine="actors")) == "actors"
    assert generation.engine_kind(PPOConfig(vllm_url="http://127.0.0.1:1", vllm_engine="actors")) == "server"
    assert generation.engine_kind(PPOConfig(vllm_url="http://127.0.0.1:1", generation_backend="transformers")) \
        == "transformers"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    # vLLM importable here (a cluster's CUDA image): engines as Ray actors, the server only when asked for
    assert generation.engine_kind(PPOConfig(generation_backend="vllm")) == "actors"
    assert generation.engine_kind(PPOConfig(generation_backend="vllm", vllm_engine="server")) == "server"
    monkeypatch.setattr(generation.torch.cuda, "is_available", lambda: True)
    assert generation.engine_kind(PPOConfig()) == "actors"  # auto on CUDA with vLLM installed
    assert generation.engine_kind(PPOConfig(generation_backend="transformers")) == "transformers"


def test_vllm_engine_actors_asked_for_but_missing_is_a_clear_error(tmp_path, tokenizer):
    cfg = PPOConfig(generation_backend="vllm", vllm_engine="actors", vllm_venv=str(tmp_path / "no-venv"))
    with pytest.raises(BackendUnavailable, match="vLLM generation unavailable: vllm is not installed.*setup_vllm_cpu.sh"):
        make_engine(cfg, object(), tmp_path, tokenizer, tmp_path)


def test_a_local_ray_cluster_has_room_for_the_vllm_engine_actors(tmp_path):
    from priorzero_core.config import PriorZeroConfig
    from priorzero_core.ray_cluster import local_cpus

    ppo = dict(algorithm="grpo", n_samples_per_prompt=2, vllm_venv=str(tmp_path / "no-venv"))
    plain = PriorZeroConfig.model_validate({"ppo": ppo})
    engines = PriorZeroConfig.model_validate({"ppo": {**ppo, "generation_backend": "vllm", "vllm_engine": "actors",
                                                      "vllm_num_engines": 2, "actor_num_cpus": 4}})
    assert local_cpus(plain, ppo=True) >= 3  # policy, reference, one reward actor
    assert local_cpus(engines, ppo=True) == (3 + 2) * 4  # and two engines, 4 CPUs each

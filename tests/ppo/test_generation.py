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

import pytest

from priorzero_core.config import LLMConfig, PPOConfig
from priorzero_core.llm_prior import load_tokenizer, resolve_model_dir
from priorzero_core.ppo.adapter import (
    ANSWER_PREFILL,
    THINK_PREFILL,
    GameSegmentToORZAdapter,
    read_prompts,
    write_prompts,
)
from priorzero_core.replay import GameSegment


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir(LLMConfig()))


def _tokens(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_prompts_carry_what_the_reward_needs(zork_segment, tokenizer):
    records = GameSegmentToORZAdapter(PPOConfig(think=True)).convert_segments_to_prompts([zork_segment], tokenizer)
    assert len(records) == len(zork_segment.steps)
    for rec, step in zip(records, zork_segment.steps):
        assert rec.prompt.endswith(THINK_PREFILL) and "<answer>" in rec.prompt
        assert f"[Valid Actions] {', '.join(step.valid_actions)}" in rec.prompt
        assert rec.valid_actions == step.valid_actions and rec.visit_dist == step.visit_dist
        assert rec.env_state == step.env_state and rec.action == step.action
        assert _tokens(tokenizer, rec.prompt) <= 512
    assert f"Action: {zork_segment.steps[0].action}" in records[1].prompt  # history of earlier steps


def test_answer_prefill_for_small_models_by_default(zork_segment, tokenizer):
    rec = GameSegmentToORZAdapter(PPOConfig()).convert_segments_to_prompts([zork_segment], tokenizer)[0]
    assert rec.prompt.endswith(ANSWER_PREFILL) and rec.prefill == ANSWER_PREFILL


def test_truncation_drops_history_then_observation_head_on_token_boundaries(zork_segment, tokenizer):
    cfg = PPOConfig(max_prompt_tokens=140, history_length=4)
    adapter = GameSegmentToORZAdapter(cfg)
    step = zork_segment.steps[5]
    prompt = adapter.render_prompt(tokenizer, zork_segment.steps[:5], step.observation + " ünïcødé ✓", step.valid_actions)
    assert _tokens(tokenizer, prompt) <= 140
    assert "[History]" not in prompt and "\ufffd" not in prompt
    assert "ünïcødé ✓" in prompt  # the observation's tail survives
    assert f"[Valid Actions] {', '.join(step.valid_actions)}" in prompt


def test_valid_actions_that_cannot_fit_are_an_error(zork_segment, tokenizer):
    step = zork_segment.steps[0]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        GameSegmentToORZAdapter(PPOConfig(max_prompt_tokens=20)).render_prompt(tokenizer, [], step.observation, step.valid_actions * 10)


def test_steps_without_env_state_give_no_prompt_and_history_spans_segments(zork_segment, tokenizer):
    first = GameSegment("ep", 0, 0, [s for s in zork_segment.steps[:3]])
    second = GameSegment("ep", 1, 3, [s for s in zork_segment.steps[3:5]])
    second.steps[0] = type(second.steps[0])(**{**second.steps[0].__dict__, "env_state": None})
    records = GameSegmentToORZAdapter(PPOConfig()).convert_segments_to_prompts([second, first], tokenizer)
    assert [r.step for r in records] == [0, 1, 2, 4]
    assert f"Action: {zork_segment.steps[3].action}" in records[-1].prompt  # history crossed into segment 0's steps


def test_prompt_file_round_trips(zork_segment, tokenizer, tmp_path):
    records = GameSegmentToORZAdapter(PPOConfig(think=True)).convert_segments_to_prompts([zork_segment], tokenizer)
    assert read_prompts(write_prompts(tmp_path / "p.jsonl", records)) == records


def test_extract_training_data(zork_segment):
    data = GameSegmentToORZAdapter.extract_training_data([zork_segment])
    assert data.actions == [s.action for s in zork_segment.steps]
    assert data.rewards == [s.reward for s in zork_segment.steps] and 5.0 in data.rewards
    assert data.mcts_policies[0] == zork_segment.steps[0].visit_dist and data.states[0] == zork_segment.steps[0].env_state

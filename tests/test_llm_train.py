"""LLM training from search: SFT to visit distributions, PPO-clip RFT on executed actions, LoRA/full, checkpoints."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from priorzero_core.config import LLMConfig, LoraConfig
from priorzero_core.errors import ConfigError
from priorzero_core.llm_prior import TransformersPrior, score_batched
from priorzero_core.llm_train import METRIC_KEYS, LLMSample, LLMTrainer

STATES = [
    ("West of House. There is a small mailbox here.", ["open mailbox", "north", "south"]),
    ("You are in a dark room. It is pitch black.", ["light lamp", "go up"]),
    ("Kitchen. A table holds a brown sack.", ["take sack", "west", "open sack"]),
]


def _cfg(**overrides) -> LLMConfig:
    """LoRA unless told otherwise: the behaviour tests run on CPU and full fine-tuning costs more per step."""
    base = dict(lr=3e-4, batch_size=3, updates_per_train=2, history_length=0, lora=LoraConfig(enabled=True))
    return LLMConfig(**{**base, **overrides})


def _prior(lm, cfg: LLMConfig) -> TransformersPrior:
    model, tok = lm
    return TransformersPrior(copy.deepcopy(model), tok, cfg)


def _samples(prior: TransformersPrior, advantages=(1.0, -1.0, 0.5)) -> list[LLMSample]:
    samples = []
    for (obs, actions), adv in zip(STATES, advantages):
        visits = np.full(len(actions), 0.1 / (len(actions) - 1))
        visits[-1] = 0.9
        samples.append(LLMSample(prior.build_prompt([], obs, actions), actions, visits, 0, adv))
    return samples


def _label_logprobs(prior: TransformersPrior, samples: list[LLMSample]) -> list[np.ndarray]:
    batch = [(s.prompt, s.valid_actions) for s in samples]
    return [s.label_logprob for s in score_batched(prior.model, prior.tokenizer, batch, prior.cfg.prior_temperature)]


def _cross_entropy(prior: TransformersPrior, samples: list[LLMSample]) -> float:
    scores = prior.score([(s.prompt, s.valid_actions) for s in samples])
    return float(np.mean([-(s.visit_dist * lp).sum() for s, lp in zip(samples, scores)]))


def test_both_losses_are_nonzero_and_all_metrics_reported(tiny_lm):
    prior = _prior(tiny_lm, _cfg(batch_size=2))
    metrics = LLMTrainer(prior, prior.cfg).train(_samples(prior))
    assert tuple(metrics) == METRIC_KEYS
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["train/llm_sft_loss"] > 0 and metrics["train/llm_rft_loss"] != 0
    assert metrics["train/llm_kl"] > 0 and metrics["train/llm_grad_norm"] > 0
    assert metrics["train/llm_total_loss"] == pytest.approx(metrics["train/llm_sft_loss"] + metrics["train/llm_rft_loss"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_moves_the_right_weights_and_the_prior_scores_with_them(tiny_lm, lora):
    cfg = _cfg(lr=3e-4 if lora else 1e-5, updates_per_train=1, lora=LoraConfig(enabled=lora))
    prior = _prior(tiny_lm, cfg)
    samples = _samples(prior)
    before_scores = prior.score([(s.prompt, s.valid_actions) for s in samples])
    trainer = LLMTrainer(prior, cfg)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train(samples)
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    if lora:
        assert moved and all("lora_" in name for name in moved)
        assert any("lora_B" in name for name in moved)
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in moved
    after_scores = prior.score([(s.prompt, s.valid_actions) for s in samples])
    assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(before_scores, after_scores))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_bf16_scoring_copy_follows_the_fp32_weights_training_updates(tiny_lm, lora):
    model, tok = tiny_lm
    # Mean scores: bf16 rounds each token's log-prob by ≈0.1 nat, which a sum over the label would add up.
    cfg = _cfg(lr=3e-4 if lora else 1e-4, updates_per_train=1, lora=LoraConfig(enabled=lora), label_score="mean")
    prior = TransformersPrior(copy.deepcopy(model), tok, cfg, torch.bfloat16)
    assert next(prior.scorer.parameters()).dtype == torch.bfloat16
    samples = _samples(prior)
    batch = [(s.prompt, s.valid_actions) for s in samples]
    fp32 = [s.log_prior for s in score_batched(prior.model, tok, batch, cfg.prior_temperature, cfg.label_score, cfg.label_length_penalty)]
    before = prior.score(batch)
    assert max(np.abs(a - b).max() for a, b in zip(fp32, before)) < 0.15  # bf16 rounding (≈0.1 nat), not another model

    trainer = LLMTrainer(prior, cfg)
    trainer.train(samples)  # ends with prior.sync_weights(trainer.model)

    assert next(trainer.model.parameters()).dtype == torch.float32  # updates land on fp32 weights
    plain = copy.deepcopy(trainer.model)
    plain = (plain.merge_and_unload() if lora else plain).to(torch.bfloat16)
    expected = [s.log_prior for s in score_batched(plain, tok, batch, cfg.prior_temperature, cfg.label_score, cfg.label_length_penalty)]
    after = prior.score(batch)
    assert all(np.allclose(a, e, atol=1e-6) for a, e in zip(after, expected))
    assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(after, before))


def test_bf16_autocast_training_matches_fp32_and_keeps_fp32_weights(tiny_lm, caplog):
    runs, grads = {}, {}
    for dtype in ("float32", "bfloat16"):
        prior = _prior(tiny_lm, _cfg(updates_per_train=1, train_dtype=dtype))
        with caplog.at_level("INFO", logger="priorzero_core.llm_train"):
            caplog.clear()
            torch.manual_seed(0)  # the same LoRA initialisation in both
            trainer = LLMTrainer(prior, prior.cfg)
            runs[dtype] = trainer.train(_samples(prior))
        assert ("autocast" in caplog.text) == (dtype == "bfloat16")
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        grads[dtype] = torch.cat([p.grad.flatten() for p in trainer._params])  # the update's (clipped) gradient
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert fp32 != bf16  # the setting changes the arithmetic, not the update
    assert bf16["train/llm_sft_loss"] == pytest.approx(fp32["train/llm_sft_loss"], rel=0.02)
    assert torch.nn.functional.cosine_similarity(grads["float32"], grads["bfloat16"], dim=0) > 0.98
    # old/ref are taken as the update takes its own log-probs (one prompt, the same labels), so bf16 rounding is
    # not read as a policy change: at the first update the ratio is exactly 1, as in fp32, and the KL 0.
    assert bf16["train/llm_kl"] == 0 and bf16["train/llm_rft_loss"] == pytest.approx(fp32["train/llm_rft_loss"], abs=1e-6)


def test_sft_lowers_cross_entropy_to_the_visit_distribution(smollm):
    cfg = _cfg(rft_weight=0.0, updates_per_train=3)
    prior = _prior(smollm, cfg)
    samples = _samples(prior)
    before = _cross_entropy(prior, samples)
    metrics = LLMTrainer(prior, cfg).train(samples)
    assert metrics["train/llm_rft_loss"] == 0 and metrics["train/llm_kl"] == 0
    assert _cross_entropy(prior, samples) < before - 0.05


def test_rft_reinforces_the_executed_action_label_by_advantage_sign(tiny_lm):
    cfg = _cfg(sft_weight=0.0)
    prior = _prior(tiny_lm, cfg)
    samples = _samples(prior, advantages=(2.0, -1.0))
    before = _label_logprobs(prior, samples)
    LLMTrainer(prior, cfg).train(samples)
    after = _label_logprobs(prior, samples)
    assert after[0][0] > before[0][0]  # positive advantage: the executed label gets likelier
    assert after[1][0] < before[1][0]  # negative advantage: less likely


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_saved_state_restores_weights_and_optimizer(tiny_lm, tmp_path, lora):
    cfg = _cfg(lr=3e-4 if lora else 1e-5, updates_per_train=1, rft_weight=0.0, lora=LoraConfig(enabled=lora))
    prior = _prior(tiny_lm, cfg)
    samples = _samples(prior)[:1]
    trainer = LLMTrainer(prior, cfg)
    trainer.train(samples)
    trainer.save_state(tmp_path)

    fresh = _prior(tiny_lm, cfg)
    restored = LLMTrainer(fresh, cfg)
    restored.load_state(tmp_path)
    batch = [(s.prompt, s.valid_actions) for s in samples]
    np.testing.assert_allclose(fresh.score(batch)[0], prior.score(batch)[0], atol=1e-6)
    saved_state = trainer.optimizer.state_dict()["state"]
    loaded_state = restored.optimizer.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys()
    first = next(iter(saved_state))
    assert torch.equal(saved_state[first]["exp_avg"], loaded_state[first]["exp_avg"])


def test_zero_loss_weights_are_a_config_error(tiny_lm):
    cfg = _cfg(sft_weight=0.0, rft_weight=0.0)
    with pytest.raises(ConfigError, match="both 0"):
        LLMTrainer(_prior(tiny_lm, cfg), cfg)


@pytest.mark.parametrize("label_score", ["sum", "mean"])
def test_label_chunks_backpropagate_the_same_gradient_as_one_graph(tiny_llm_dir, monkeypatch, label_score):
    """Training bounds memory by backpropagating a few labels at a time; the gradient must not change."""
    from transformers import AutoModelForCausalLM

    from priorzero_core import llm_train
    from priorzero_core.llm_prior import label_token_logprobs, load_tokenizer, log_prior

    cfg = LLMConfig(model=str(tiny_llm_dir), history_length=0, sft_weight=1.0, rft_weight=0.5, prior_temperature=2.0,
                    label_score=label_score, label_length_penalty=0.7)
    prior = TransformersPrior(AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval(), load_tokenizer(tiny_llm_dir), cfg)
    trainer = LLMTrainer(prior, cfg)
    samples = _samples(prior)
    encoded = [trainer._encode(s) for s in samples]
    old = trainer._executed_logprobs(encoded, reference=False)
    ref = [o - 0.1 for o in old]  # a reference that differs, so the KL term has a gradient
    adv = torch.tensor([1.0, -1.0, 0.5])
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    monkeypatch.setattr(llm_train, "TRAIN_CACHED_TOKENS", 1)  # one label per backward
    trainer.model.zero_grad()
    trainer._accumulate([0, 1, 2], encoded, old, ref, adv)
    chunked = [p.grad.clone() for p in params]

    trainer.model.zero_grad()
    total = torch.zeros(())
    for i, e in enumerate(encoded):
        lp = label_token_logprobs(trainer._lm, [e.prompt], [e.labels], trainer._pad_id)[0]
        scores = lp.score(cfg.label_score, cfg.label_length_penalty)
        total = total - (e.visits * log_prior(scores, cfg.prior_temperature)).sum()
        new = lp.tokens[e.action_index][lp.mask[e.action_index]]
        total = total + cfg.rft_weight * trainer._rft_loss(new, old[i], ref[i], float(adv[i]))[0]
    (total / 3).backward()

    assert all(torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4) for a, p in zip(chunked, params))
    assert any(a.abs().sum() > 0 for a in chunked)


def test_saving_one_model_twice_writes_the_same_bytes(tiny_llm_dir, tmp_path):
    """safetensors' save_model put the tied-weight aliases beside `kind` in the header's metadata, in an order
    that varied from save to save: identical models made different files, and checkpoints differed."""
    from transformers import AutoModelForCausalLM

    from priorzero_core.llm_prior import load_tokenizer
    from priorzero_core.llm_train import WEIGHTS_FILE

    cfg = LLMConfig(model=str(tiny_llm_dir), history_length=0, lora=LoraConfig(enabled=False))
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()
    trainer = LLMTrainer(TransformersPrior(model, load_tokenizer(tiny_llm_dir), cfg), cfg)
    files = set()
    for n in range(6):
        trainer.save_state(tmp_path / str(n))
        files.add((tmp_path / str(n) / WEIGHTS_FILE).read_bytes())
    assert len(files) == 1
    trainer.load_state(tmp_path / "0")  # tied embeddings written once still load
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

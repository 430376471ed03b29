import pytest
import torch

from priorzero_core.errors import ModelError
from priorzero_core.text_encoder import resolve_encoder_dir


def test_embeddings_are_384_d_unit_vectors(text_encoder):
    emb = text_encoder.encode(["West of House. There is a small mailbox here.", "open mailbox", ""])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_similar_texts_are_closer_than_unrelated_ones(text_encoder):
    a, b, c = text_encoder.encode(["open the mailbox", "open mailbox", "the troll swings his axe at you"])
    assert a @ b > a @ c + 0.2


def test_cache_hit_returns_identical_rows_and_matches_an_uncached_pass(text_encoder):
    texts = ["take lamp", "go north", "take lamp"]
    first = text_encoder.encode(texts)
    assert torch.equal(first[0], first[2])
    assert torch.equal(text_encoder.encode(["go north"])[0], first[1])
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(texts), first, atol=1e-5, rtol=0)


def test_a_texts_embedding_does_not_depend_on_the_texts_encoded_with_it(text_encoder):
    """Padded to the batch's longest text, a text's embedding moved in the last float bits with its company, so
    a resumed run (cold cache) drifted from the run it continued."""
    short, long_ = "open the mailbox", "you are standing in an open field west of a white house " * 3
    with torch.no_grad():
        alone = text_encoder._encode_chunked([short])
        together = text_encoder._encode_chunked([long_, short, "north"])
    assert torch.equal(alone[0], together[1])


def test_cache_evicts_least_recently_used(text_encoder, monkeypatch):
    monkeypatch.setattr(text_encoder, "_cache", type(text_encoder._cache)())
    monkeypatch.setattr(text_encoder, "cache_size", 2)
    text_encoder.encode(["a", "b"])
    key_a, key_b = text_encoder._cache
    text_encoder.encode(["a", "c"])
    assert len(text_encoder._cache) == 2 and key_a in text_encoder._cache and key_b not in text_encoder._cache


def test_grad_encoding_needs_finetuning(text_encoder):
    with pytest.raises(ValueError, match="finetune_encoder"):
        text_encoder.encode(["go north"], grad=True)


def test_unknown_encoder_dir_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_encoder_dir(str(tmp_path))

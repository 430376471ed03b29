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


TEXTS = ["West of House. There is a small mailbox here.", "open mailbox", "", "x " * 400,
         "Ünïcödé straße — naïve café!", "THE troll swings his AXE"]


def test_the_built_in_encoder_computes_what_transformers_bert_model_computes(text_encoder):
    """Its own BERT (no transformers import) gives transformers' token ids and embeddings, bit for bit here."""
    from transformers import AutoModel, AutoTokenizer

    from priorzero_core.text_encoder import MAX_TOKENS

    path = resolve_encoder_dir("all-minilm-l6-v2")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    assert text_encoder._tokenize(TEXTS) == tokenizer(TEXTS, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    for pad_to in (None, MAX_TOKENS):
        batch = tokenizer(TEXTS, padding="max_length" if pad_to else True, truncation=True,
                          max_length=pad_to or MAX_TOKENS, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            torch.testing.assert_close(text_encoder(TEXTS, pad_to=pad_to), expected, atol=1e-6, rtol=0)


def test_other_encoder_directories_load_through_transformers(text_encoder, tmp_path):
    import shutil

    from priorzero_core.text_encoder import TextEncoder

    path = tmp_path / "encoder"
    shutil.copytree(resolve_encoder_dir("all-minilm-l6-v2"), path)
    (path / "tokenizer.json").unlink()  # not the built-in layout: transformers' AutoModel and AutoTokenizer
    other = TextEncoder(str(path))
    assert type(other.model).__name__ == "_Transformers"
    with torch.no_grad():
        torch.testing.assert_close(other(TEXTS), text_encoder(TEXTS), atol=1e-5, rtol=0)


def test_a_run_without_an_llm_never_imports_transformers_model_code():
    import subprocess
    import sys

    code = ("import sys, tempfile\n"
            "from priorzero_core.config import load_config\n"
            "from priorzero_core.trainer import Trainer\n"
            "t = Trainer(load_config('debug', ['llm.enabled=false']), tempfile.mkdtemp(), progress=False)\n"
            "t.encoder.encode(['open mailbox'])\n"
            "t.close()\n"
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"

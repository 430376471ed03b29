"""Time naive (one forward per action) against batched prefix-KV scoring of valid actions with SmolLM2.

Both run in the same process on the same prompts after a warm-up; the last line is
`ratio llm_scoring <naive seconds / batched seconds>`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from priorzero_core.config import LLMConfig
from priorzero_core.llm_prior import ActionScores, ScoreRequest, build_prompt, load_causal_lm, score_batched, score_naive

HISTORY = [
    ("ZORK I: The Great Underground Empire\nCopyright (c) 1981, 1982, 1983 Infocom, Inc. All rights reserved.", "look", 0.0),
    ("The small mailbox is closed.", "open mailbox", 0.0),
]
OBSERVATION = (
    "Opening the small mailbox reveals a leaflet.\n\nWest of House\nYou are standing in an open field west of a "
    "white house, with a boarded front door. There is a small mailbox here."
)
ACTIONS = [
    "take leaflet", "close mailbox", "north", "south", "west", "east", "open door", "read leaflet",
    "go around house", "look", "inventory", "take mailbox", "kick mailbox", "climb house", "knock on door",
    "wait", "jump", "listen", "smell", "examine house", "enter house", "break door", "shout", "pray",
]


def _time(fn: Callable[[], list[ActionScores]], repeats: int) -> tuple[list[float], list[ActionScores]]:
    fn()  # warm-up: allocator, kernels, tokenizer caches
    times, result = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _max_diff(a: Sequence[ActionScores], b: Sequence[ActionScores]) -> float:
    return max(float(np.abs(x.label_logprob - y.label_logprob).max()) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actions", type=int, default=20, help="valid actions per env (at most %(default)s+4)")
    parser.add_argument("--envs", type=int, default=1, help="envs scored per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method after one warm-up")
    args = parser.parse_args()
    if not 1 <= args.actions <= len(ACTIONS):
        parser.error(f"--actions must be in 1..{len(ACTIONS)}")

    model, tokenizer = load_causal_lm(LLMConfig(backend="transformers"))
    actions = ACTIONS[: args.actions]
    prompt = build_prompt(tokenizer, HISTORY, OBSERVATION, actions, history_length=4, max_prompt_tokens=512)
    # Distinct prompts per env (different history lengths) so padding is exercised as in collection.
    batch: list[ScoreRequest] = [
        (build_prompt(tokenizer, HISTORY[: len(HISTORY) - env % 2], OBSERVATION, actions, history_length=4, max_prompt_tokens=512), actions)
        for env in range(args.envs)
    ]
    prompt_tokens = [len(tokenizer.encode(p, add_special_tokens=False)) for p, _ in batch]

    naive_times, naive = _time(lambda: score_naive(model, tokenizer, batch, 1.0), args.repeats)
    fast_times, fast = _time(lambda: score_batched(model, tokenizer, batch, 1.0), args.repeats)
    diff = _max_diff(naive, fast)

    print(f"prompt tokens {prompt_tokens} (first prompt {len(prompt)} chars), {args.actions} actions x {args.envs} envs, {args.repeats} repeats")
    print(f"{'method':<22}{'median s':>10}{'min s':>10}")
    for name, times in (("naive (1 fwd/action)", naive_times), ("batched prefix-KV", fast_times)):
        print(f"{name:<22}{statistics.median(times):>10.3f}{min(times):>10.3f}")
    print(f"max |naive - batched| mean label log-prob: {diff:.2e} ({'agree' if diff < 1e-4 else 'DISAGREE'})")
    print(f"ratio llm_scoring {statistics.median(naive_times) / statistics.median(fast_times):.2f}")


if __name__ == "__main__":
    main()

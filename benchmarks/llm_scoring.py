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
    ("ZORK I: The Great Underground Empire\nWest of House\nThere is a small mailbox here.", "look", 0.0),
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


def _timed(fn: Callable[[], list[ActionScores]]) -> tuple[float, list[ActionScores]]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _max_diff(a: Sequence[ActionScores], b: Sequence[ActionScores]) -> float:
    return max(float(np.abs(x.label_logprob - y.label_logprob).max()) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actions", type=int, default=20, help=f"valid actions per env, 1..{len(ACTIONS)} (default %(default)s)")
    parser.add_argument("--envs", type=int, default=1, help="envs scored per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method after one warm-up")
    args = parser.parse_args()
    if not 1 <= args.actions <= len(ACTIONS):
        parser.error(f"--actions must be in 1..{len(ACTIONS)}")

    model, tokenizer = load_causal_lm(LLMConfig(backend="transformers"))
    actions = ACTIONS[: args.actions]
    # Distinct prompts per env (different history lengths) so padding is exercised as in collection.
    batch: list[ScoreRequest] = [
        (build_prompt(tokenizer, HISTORY[-1 - env % 2 :], OBSERVATION, actions, history_length=4, max_prompt_tokens=512), actions)
        for env in range(args.envs)
    ]
    prompt_tokens = [len(tokenizer.encode(p, add_special_tokens=False)) for p, _ in batch]

    methods = {
        "naive (1 fwd/action)": lambda: score_naive(model, tokenizer, batch, 1.0),
        "batched prefix-KV": lambda: score_batched(model, tokenizer, batch, 1.0),
    }
    for fn in methods.values():
        fn()  # warm-up: allocator, kernels, tokenizer caches
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, list[ActionScores]] = {}
    # Interleaved so that load from other processes hits both methods alike.
    for _ in range(args.repeats):
        for name, fn in methods.items():
            elapsed, results[name] = _timed(fn)
            times[name].append(elapsed)
    naive_times, fast_times = times.values()
    diff = _max_diff(*results.values())

    print(f"prompt tokens {prompt_tokens}, {args.actions} actions x {args.envs} envs, {args.repeats} interleaved repeats")
    print(f"{'method':<22}{'median s':>10}{'min s':>10}")
    for name, method_times in times.items():
        print(f"{name:<22}{statistics.median(method_times):>10.3f}{min(method_times):>10.3f}")
    print(f"max |naive - batched| mean label log-prob: {diff:.2e} ({'agree' if diff < 1e-4 else 'DISAGREE'})")
    print(f"ratio llm_scoring {statistics.median(naive_times) / statistics.median(fast_times):.2f}")


if __name__ == "__main__":
    main()

"""Evaluate a run's latest checkpoint with other world-model weights in its place: does averaging weights steady
the greedy agent from one iteration to the next?

    python scripts/eval_weights.py RUN_DIR WEIGHTS [--episodes 20] [--set KEY=VALUE ...]

WEIGHTS: `live` (the trained weights, as `priorzero eval` uses), `target` (the EMA target network saved beside
them, `world_model.target_update_tau` per update), `mean:K` (the mean of the last K checkpoints' trained weights,
as many as the run kept) or `iter:N` (iteration N's checkpoint's trained weights, the rest of the agent from the
latest). Everything else is the latest checkpoint's, under the evaluation protocol of docs/benchmarks.md; the run
is only read (the transcript goes to RUN_DIR/transcripts/ as `priorzero eval`'s does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from priorzero_core import checkpoint as ckpt
from priorzero_core.config import load_config
from priorzero_core.trainer import Trainer


def weights(run_dir: Path, which: str) -> dict[str, torch.Tensor] | None:
    kept = sorted((run_dir / "checkpoints").glob("iter-*"))
    if not kept:
        raise SystemExit(f"{run_dir}: no checkpoints")
    if which == "live":
        return None
    if which == "target":
        return ckpt.load_tensors(kept[-1], "world_model_target")
    kind, _, n = which.partition(":")
    if kind == "mean" and n.isdigit() and int(n) > 0:
        states = [ckpt.load_tensors(d, "world_model") for d in kept[-int(n):]]
        print(f"mean of {[d.name for d in kept[-int(n):]]}")
        return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) for k, v in states[0].items()}
    if kind == "iter" and n.isdigit():
        path = run_dir / "checkpoints" / f"iter-{int(n):06d}"
        if not path.is_dir():
            raise SystemExit(f"{run_dir}: no checkpoint of iteration {n} (kept: {[d.name for d in kept]})")
        return ckpt.load_tensors(path, "world_model")
    raise SystemExit(f"WEIGHTS must be live, target, mean:K or iter:N, not {which!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("weights")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    state = weights(args.run_dir, args.weights)
    cfg = load_config(args.run_dir / "config.yaml", [f"eval.num_episodes={args.episodes}", *args.overrides])
    trainer = Trainer(cfg, args.run_dir, resume=True, readonly=True)
    try:
        if state is not None:
            trainer.wm.model.load_state_dict(state)
        result = trainer.evaluate(trainer.iteration)
    finally:
        trainer.close()
    m = result.metrics
    print(f"{args.weights}: mean {m['evals/reward_mean']:.2f} max {m['evals/reward_max']:.0f} "
          f"episode length {m['evals/episode_length']:.1f}; transcript {result.artifacts.get('transcript')}")


if __name__ == "__main__":  # the valid-action workers start by spawn
    main()

"""Learning curves of finished runs, read back from their MLflow runs, as one PNG (for docs/benchmarks.md).

Each RUN_DIR is a run directory made by `priorzero train` (its mlflow_run.json names the MLflow run and the
store). The left panel plots `evals/reward_mean` (solid: the mean over the evaluation's episodes) and
`evals/reward_max` (dashed, where the run logged it) against env steps collected, the right one against wall-clock
minutes; `--baseline LABEL=VALUE` draws a horizontal line (e.g. the random agent over the same valid actions,
from `priorzero eval RUN_DIR eval.modes=[random] eval.num_episodes=20`). Also prints each run's table.

    python scripts/learning_curves.py runs/debug-llm --baseline "random=2.75" --out docs/img/curve.png
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from mlflow import MlflowClient

REWARD, MAX, STEPS, SECONDS = "evals/reward_mean", "evals/reward_max", "collect/total_env_steps", "timing/iteration_s"


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def curve(run_dir: Path) -> tuple[str, list[tuple[int, float, float, float, float | None]]]:
    """(MLflow run id, [(iteration, env steps, minutes since start, mean reward, max reward)]) for one run."""
    ref = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=ref["tracking_uri"])
    reward, steps = history(client, ref["run_id"], REWARD), history(client, ref["run_id"], STEPS)
    seconds, best = history(client, ref["run_id"], SECONDS), history(client, ref["run_id"], MAX)
    rows, elapsed = [], 0.0
    for it in sorted(set(reward) | set(seconds)):
        if it in reward:
            # Evaluation opens an iteration: it sees the env steps and the time of the iterations before.
            rows.append((it, steps.get(it - 1, 0.0), elapsed / 60, reward[it], best.get(it)))
        elapsed += seconds.get(it, 0.0)
    return ref["run_id"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to plot")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=VALUE",
                        help="a horizontal reference line, e.g. random=2.75 (repeatable)")
    parser.add_argument("--max-score", type=float, help="draw the game's max score as a dotted line")
    parser.add_argument("--title", default="evaluation reward", help="figure title")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    by_steps, by_time = fig.subplots(1, 2, sharey=True)
    for run_dir in args.run_dirs:
        run_id, rows = curve(run_dir)
        print(f"{run_dir} (MLflow run {run_id})")
        print(f"{'iteration':>10}{'env steps':>11}{'minutes':>9}{'mean':>8}{'max':>8}")
        for it, steps, minutes, reward, top in rows:
            print(f"{it:>10}{steps:>11.0f}{minutes:>9.1f}{reward:>8.2f}{'' if top is None else f'{top:>8.0f}'}")
        label = run_dir.name
        for ax, x in ((by_steps, 1), (by_time, 2)):
            line, = ax.plot([r[x] for r in rows], [r[3] for r in rows], marker=".", label=f"{label} mean")
            tops = [(r[x], r[4]) for r in rows if r[4] is not None]
            if tops:
                ax.plot(*zip(*tops), linestyle="--", color=line.get_color(), alpha=0.6, label=f"{label} max")
    for item, style in zip(args.baseline, itertools.cycle(["--", "-.", ":"])):
        name, _, value = item.partition("=")
        for ax in (by_steps, by_time):
            ax.axhline(float(value), color="grey", linestyle=style, label=name)
    if args.baseline:
        for ax in (by_steps, by_time):
            ax.margins(y=0.08)  # a reference line at the edge of the data stays visible
    if args.max_score is not None:
        for ax in (by_steps, by_time):
            ax.axhline(args.max_score, color="black", linestyle=":", label="max score")
    by_steps.set(xlabel="env steps collected", ylabel=REWARD, title=args.title)
    by_time.set(xlabel="training minutes before the evaluation (sum of iteration times)", title=args.title)
    by_steps.legend(fontsize="small")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

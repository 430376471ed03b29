"""What the Prefect UI shows on a training flow run besides its task boxes (the Artifacts tab).

- `<run>-progress`: a progress artifact, iterations done of the schedule (or time spent of the time budget,
  whichever is further), updated after every iteration;
- `<run>-evaluation`: a table artifact after each evaluation: mean / max / episode length / win rate per mode,
  with the env steps so far and the first episode's opening moves;
- `<run>-mlflow`: where the run's MLflow run is (a link when the store is a tracking server, else the run id
  and the command that opens it).

The same progress, with an ETA, goes to the flow's log after each iteration (`progress_line`). Artifacts never
stop training: a failed call is logged once and artifacts stop for the rest of the flow run. Nor do they slow it:
the flow thread only queues the calls (their contents computed when queued); one daemon thread sends them in order,
in the flow run's context (Prefect reads the flow run and its API from context variables), and `close` waits a
bounded time for the last ones.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

from priorzero_core.config import PriorZeroConfig
from priorzero_core.errors import first_line

OPENING_MOVES = 12  # moves of the first evaluation episode quoted under the evaluation table
CLOSE_TIMEOUT_S = 30.0  # how long the flow's end waits for queued artifacts (a hung server never holds it longer)
KILLED_CLOSE_TIMEOUT_S = 2.0  # the same after SIGTERM or Ctrl-C


def artifact_key(run_name: str, what: str) -> str:
    """Prefect artifact keys hold lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{run_name}-{what}".lower())).strip("-")


def evaluation_table(row: dict[str, float]) -> list[dict[str, Any]]:
    """One row per evaluation mode from an iteration's metrics (`evals/<mode>/<stat>`)."""
    modes = sorted({k.split("/")[1] for k in row if k.startswith("evals/") and k.count("/") == 2})
    stats = ("reward_mean", "reward_max", "episode_length", "win_rate")
    return [{"mode": m, **{s: round(row[f"evals/{m}/{s}"], 3) for s in stats if f"evals/{m}/{s}" in row}}
            for m in modes]


def opening_moves(transcript: Path, n: int = OPENING_MOVES) -> str:
    """The first episode's first `n` commands from an evaluation transcript, as '> a > b …'."""
    try:
        lines = transcript.read_text().splitlines()
    except OSError:
        return ""
    moves = []
    for line in lines[1:]:
        if line.startswith("==="):  # the next episode
            break
        if line.startswith("> "):
            moves.append(line)
    return " ".join(moves[:n]) + (" …" if len(moves) > n else "")


def mlflow_run_location(uri: str, experiment_id: str, run_id: str) -> tuple[Optional[str], str]:
    """(a link to the MLflow run, or None when no server serves the store; a markdown line saying where it is)."""
    if uri.startswith(("http://", "https://")):
        link = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return link, f"MLflow run [{run_id}]({link})"
    return None, (f"MLflow run `{run_id}` (experiment {experiment_id}) in the store `{uri}`: open it with "
                  f"`mlflow ui --backend-store-uri {uri}` and go to "
                  f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}")


class RunArtifacts:
    """The flow run's artifacts and progress line for one training run."""

    def __init__(self, cfg: PriorZeroConfig, run_name: str, logger: logging.Logger | logging.LoggerAdapter,
                 first_iteration: int):
        self.total = cfg.schedule.iterations
        self.budget = cfg.schedule.time_budget_s
        self.max_steps = cfg.eval.max_episode_steps
        self.episodes = cfg.eval.num_episodes
        self.run_name = run_name
        self.log = logger
        self.first = first_iteration  # iterations done before this flow run (a resume)
        self.started = time.monotonic()
        self._progress_id: Any = None
        self._off = False
        self._queue: queue.Queue[Optional[tuple[contextvars.Context, str, Any, tuple, dict]]] = queue.Queue()
        self._sender: Optional[threading.Thread] = None

    def _send(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Queue `fn(*args, **kwargs)` for the sender thread, to run in a copy of the caller's context."""
        if self._off:
            return
        if self._sender is None:
            self._sender = threading.Thread(target=self._drain, name="prefect-artifacts", daemon=True)
            self._sender.start()
        self._queue.put((contextvars.copy_context(), what, fn, args, kwargs))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            context, what, fn, args, kwargs = item
            context.run(self._call, what, fn, *args, **kwargs)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._off:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # the UI's extras never stop training
            if self._off:  # a call `close` stopped waiting for: the flow is over
                return None
            self._off = True
            self.log.warning("Prefect artifacts off for this flow run: %s failed (%s: %s)", what, type(err).__name__,
                             first_line(err))
            return None

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is queued (waiting at most `timeout` s), then stop the sender."""
        if self._sender is None:
            return
        self._queue.put(None)
        self._sender.join(timeout)
        if self._sender.is_alive():
            self._off = True  # whatever is still queued is dropped
            self.log.warning("Prefect artifacts: the last updates were not sent within %.0f s", timeout)

    def fraction(self, done: int) -> float:
        """How far the run is: iterations done of the schedule, or time spent of the time budget if further."""
        frac = done / self.total
        if self.budget:
            frac = max(frac, (time.monotonic() - self.started) / self.budget)
        return min(1.0, frac)

    def progress_line(self, done: int) -> str:
        """'12/100 iterations (12 %), ETA 0:41:05' from this flow run's pace."""
        elapsed = time.monotonic() - self.started
        ran = done - self.first
        left = []
        if ran > 0:
            left.append(elapsed / ran * (self.total - done))
        if self.budget:
            left.append(max(0.0, self.budget - elapsed))
        eta = f", ETA {_clock(min(left))}" if left else ""
        return f"{done}/{self.total} iterations ({100 * self.fraction(done):.0f} %){eta}"

    def start(self) -> None:
        from prefect.artifacts import create_progress_artifact

        def create(percent: float, description: str) -> None:
            self._progress_id = create_progress_artifact(percent, key=artifact_key(self.run_name, "progress"),
                                                         description=description)

        self._send("progress artifact", create, 100 * self.fraction(self.first),
                   f"Training {self.run_name}: {self.progress_line(self.first)}")

    def iteration_done(self, n: int, row: dict[str, float], transcript: Optional[Path]) -> None:
        from prefect.artifacts import create_table_artifact, update_progress_artifact

        def update(percent: float, description: str) -> None:
            if self._progress_id is not None:  # created by the call queued before (the sender keeps their order)
                update_progress_artifact(self._progress_id, percent, description=description)

        self._send("progress update", update, 100 * self.fraction(n),
                   f"Training {self.run_name}: {self.progress_line(n)}")
        table = evaluation_table(row)
        if table:
            steps = int(row.get("collect/total_env_steps", 0))
            moves = opening_moves(transcript) if transcript is not None else ""
            description = (f"**Evaluation at iteration {n}** ({steps} env steps collected): {self.episodes} "
                           f"episodes from the game's start, at most {self.max_steps} steps each; mean and max final "
                           f"score per mode." + (f"\n\nFirst episode: `{moves}`" if moves else ""))
            self._send("evaluation table", create_table_artifact, table, key=artifact_key(self.run_name, "evaluation"),
                       description=description)

    def mlflow_run(self, uri: str, experiment_id: str, run_id: str) -> None:
        from prefect.artifacts import create_link_artifact, create_markdown_artifact

        link, text = mlflow_run_location(uri, experiment_id, run_id)
        key = artifact_key(self.run_name, "mlflow")
        if link is not None:
            self._send("MLflow link", create_link_artifact, link, link_text=f"MLflow run {run_id}", key=key,
                       description="Metrics, parameters and artifacts of this training run")
        else:
            self._send("MLflow location", create_markdown_artifact, text, key=key,
                       description="Metrics, parameters and artifacts of this training run")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

"""The Prefect artifacts' contents and the progress line, from an iteration's metrics (no server needed)."""

import contextvars
import logging
import threading
import time

from priorzero.flows.artifacts import (RunArtifacts, artifact_key, evaluation_table, mlflow_run_location,
                                       opening_moves)
from priorzero_core.config import load_config


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("Zork_2h.run-20261130", "evaluation") == "zork-2h-run-20261130-evaluation"
    assert artifact_key("--a  b--", "progress") == "a-b-progress"


def test_the_evaluation_table_has_a_row_per_mode_and_the_transcript_gives_the_opening_moves(tmp_path):
    row = {"evals/reward_mean": 5.0, "evals/wm/reward_mean": 5.0, "evals/wm/reward_max": 10.0,
           "evals/wm/win_rate": 0.0, "evals/random/reward_mean": 1.25, "evals/random/reward_max": 2.0,
           "train/wm_total_loss": 1.0}
    assert evaluation_table(row) == [{"mode": "random", "reward_mean": 1.25, "reward_max": 2.0},
                                     {"mode": "wm", "reward_mean": 5.0, "reward_max": 10.0, "win_rate": 0.0}]
    assert evaluation_table({"train/wm_total_loss": 1.0}) == []
    transcript = tmp_path / "eval.txt"
    transcript.write_text("=== wm — episode 0 ===\n[0] Room\n> north\n[1] Hall\n> take lamp   (reward +5)\n"
                          "=== wm — episode 1 ===\n> south\n")
    assert opening_moves(transcript) == "> north > take lamp   (reward +5)"
    assert opening_moves(transcript, 1) == "> north …"
    assert opening_moves(tmp_path / "missing.txt") == ""


def test_the_mlflow_location_is_a_link_only_where_a_server_serves_the_store():
    link, text = mlflow_run_location("http://127.0.0.1:5000/", "3", "abc")
    assert link == "http://127.0.0.1:5000/#/experiments/3/runs/abc" and link in text
    link, text = mlflow_run_location("sqlite:////x/mlflow.db", "3", "abc")
    assert link is None and "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in text and "abc" in text


def test_progress_counts_iterations_or_the_time_budget_whichever_is_further(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("priorzero.flows.artifacts.time.monotonic", lambda: clock[0])
    log = logging.getLogger("test")
    art = RunArtifacts(load_config("debug", ["schedule.iterations=100"]), "run", log, first_iteration=10)
    clock[0] += 50  # 5 iterations in 50 s: 10 s each, 85 to go
    assert art.progress_line(15) == "15/100 iterations (15 %), ETA 0:14:10"
    timed = RunArtifacts(load_config("debug", ["schedule.iterations=100", "schedule.time_budget_s=200"]), "run", log, 0)
    clock[0] += 100  # half the budget gone after 5 iterations: the budget ends first
    assert timed.fraction(5) == 0.5 and timed.progress_line(5) == "5/100 iterations (50 %), ETA 0:01:40"
    assert RunArtifacts(load_config("debug"), "run", log, 0).progress_line(0).endswith("(0 %)")


def test_the_flow_thread_only_queues_artifact_calls_which_one_sender_makes_in_order_in_the_callers_context(
        monkeypatch, caplog):
    import prefect.artifacts

    run = contextvars.ContextVar("run", default=None)  # as Prefect's flow run context: what the calls must see
    run.set("flow-run-1")
    release, sent = threading.Event(), []

    def create_progress_artifact(percent, key, description):
        release.wait(10)  # a slow server
        sent.append(("create", percent, run.get(), threading.current_thread().name))
        return "progress-id"

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", create_progress_artifact)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact",
                        lambda pid, percent, description: sent.append(("update", pid, percent, run.get())))
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact",
                        lambda table, key, description: sent.append(("table", key, table[0]["mode"], run.get())))
    art = RunArtifacts(load_config("debug", ["schedule.iterations=4"]), "run", logging.getLogger("test"), 0)
    started = time.monotonic()
    art.start()
    art.iteration_done(1, {"evals/wm/reward_mean": 1.0}, None)
    art.iteration_done(2, {}, None)
    assert time.monotonic() - started < 5 and sent == []  # nothing waited for the server
    release.set()
    art.close(timeout=10)
    assert sent == [("create", 0.0, "flow-run-1", "prefect-artifacts"), ("update", "progress-id", 25.0, "flow-run-1"),
                    ("table", "run-evaluation", "wm", "flow-run-1"), ("update", "progress-id", 50.0, "flow-run-1")]

    # A server that hangs holds the flow's end for the timeout only; one that fails turns artifacts off, once.
    release.clear()
    hung = RunArtifacts(load_config("debug"), "hung", logging.getLogger("test"), 0)
    hung.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="test"):
        hung.close(timeout=0.2)
    assert time.monotonic() - started < 5 and "not sent within" in caplog.text
    release.set()

    def refused(*args, **kwargs):
        raise ConnectionError("refused")

    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", refused)
    failing = RunArtifacts(load_config("debug"), "failing", logging.getLogger("test"), 0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test"):
        for n in (1, 2):
            failing.iteration_done(n, {"evals/wm/reward_mean": 1.0}, None)
        failing.close(timeout=10)
    assert caplog.text.count("Prefect artifacts off") == 1 and "evaluation table failed (ConnectionError" in caplog.text

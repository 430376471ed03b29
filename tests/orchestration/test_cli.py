"""The `priorzero` command: help, one-line errors, config, games, play, and train → resume through the flow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from priorzero.cli import app

PRIORZERO = str(Path(sys.executable).with_name("priorzero"))
runner = CliRunner()


def test_cli_module_imports_no_heavy_library_so_help_is_quick():
    code = "import sys, priorzero.cli; print([m for m in ('torch', 'prefect', 'mlflow') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.strip() == "[]"


@pytest.mark.parametrize("command", [[], ["train"], ["resume"], ["serve"], ["config", "show"], ["games"], ["play"],
                                     ["eval"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])

    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_eval_help_shows_the_random_baseline_s_override_whole():
    """The help is rendered as Rich markup, where an unescaped `[random]` is a style tag and vanishes."""
    result = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})

    assert "eval.modes=[random] eval.num_episodes=20" in result.output


def test_prefect_s_temporary_server_gets_minutes_to_start_on_a_loaded_machine(tmp_path):
    """Prefect's own limit (20 s of sleeps) failed `priorzero train` on a busy machine before its first iteration;
    a user's own PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is kept (os.environ.setdefault)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)
    code = ("from priorzero.cli import connect_prefect; connect_prefect(require_server=False); "
            "from prefect.settings import get_current_settings as s; "
            "print(s().api.url, s().server.ephemeral.startup_timeout_seconds)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout

    assert out.split() == ["None", "180"]


def test_bad_override_is_a_one_line_error_with_exit_code_2():
    result = subprocess.run([PRIORZERO, "config", "show", "debug", "--set", "mcts.bogus=1"], capture_output=True,
                            text=True)

    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "unknown key 'mcts.bogus'" in result.stderr


def test_config_show_prints_the_resolved_yaml_with_overrides():
    result = runner.invoke(app, ["config", "show", "debug", "--set", "mcts.num_simulations=2", "llm.enabled=false"])

    shown = yaml.safe_load(result.output)
    assert shown["mcts"]["num_simulations"] == 2
    assert shown["llm"]["enabled"] is False
    assert shown["world_model"]["embed_dim"] == 128  # from configs/debug.yaml


def test_games_lists_the_embedded_game_and_rom_paths(rom_dir):
    result = runner.invoke(app, ["games", "--rom-dir", str(rom_dir)], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert "embedded" in result.output
    assert str(rom_dir / "zork1.z5") in result.output


def test_play_shows_valid_actions_and_takes_their_numbers():
    result = runner.invoke(app, ["play", "embedded"], input="2\nquit\n")

    assert result.exit_code == 0, result.output
    assert "[2] open chest drawer" in result.output
    assert "score 0, moves 0" in result.output and "score 0, moves 1" in result.output  # "2" was played


@pytest.mark.slow  # ≈ 45 s; `priorzero train` then `priorzero resume` also run in tests/reliability/test_crash_resume.py
def test_train_then_resume_continue_one_run_and_one_mlflow_run(prefect_server, debug_overrides, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    run_dir = tmp_path / "runs" / "cli-run"
    overrides = [o for o in debug_overrides if not o.startswith("run.run_dir=")]

    def priorzero(*args):
        result = subprocess.run([PRIORZERO, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return result.stdout

    assert "trained to iteration 2" in priorzero("train", "debug", "--iterations", "2", "--run-dir", str(run_dir),
                                                 "--set", *overrides)
    assert "trained to iteration 3" in priorzero("resume", str(run_dir), "--iterations", "3")

    assert (run_dir / "checkpoints" / "iter-000003").is_dir()
    assert "Task run 'collect-3'" in (run_dir / "logs" / "flow.log").read_text()
    client = MlflowClient(next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri=")))
    (run,) = client.search_runs([client.get_experiment_by_name("priorzero-embedded").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "collect/total_env_steps")] == [1, 2, 3]


def test_eval_overrides_apply_to_that_evaluation_only(tmp_path):
    from priorzero_core.config import load_config
    from priorzero_core.trainer import run_plain

    run_dir = tmp_path / "run"
    run_plain(load_config("debug", ["llm.enabled=false", "collect.steps_per_iteration=2", "mcts.num_simulations=2",
                                    "eval.max_episode_steps=2", "schedule.iterations=1"]), run_dir, progress=False)
    # As if the run were still training: iteration 2 collected and logged, not yet checkpointed. A resume sets
    # these aside; an evaluation must leave them be.
    (replay,) = (run_dir / "replay").iterdir()
    (run_dir / "replay" / "iter-000002-later.jsonl.gz").write_bytes(replay.read_bytes())
    with open(run_dir / "logs" / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 2}\n')
    def files() -> dict:  # all but the logs and transcripts an evaluation adds to
        return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
                if p.is_file() and "transcripts" not in p.parts and p.suffix != ".log"}

    saved = files()

    result = runner.invoke(app, ["eval", str(run_dir), "eval.modes=[random]", "eval.num_episodes=3"])

    assert result.exit_code == 0, result.output
    assert "evals/random/reward_mean" in result.output and "evals/wm/reward_mean" not in result.output
    assert files() == saved  # config.yaml, replay files, metrics rows as they were

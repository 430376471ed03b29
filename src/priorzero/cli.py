"""The `priorzero` command. Heavy imports (torch, Prefect, MLflow) happen inside commands so --help is quick."""

from __future__ import annotations

import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Annotated, Optional

import typer

from priorzero_core.errors import ConfigError, PriorZeroError, first_line

LOCAL_PREFECT_API = "http://127.0.0.1:4200/api"  # where `prefect server start --host 127.0.0.1` listens

app = typer.Typer(
    help="PriorZero: train agents for text adventure games (Prefect flows, MLflow tracking).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a config value, e.g. --set mcts.num_simulations=2 (repeatable; "
    "KEY=VALUE words after it are overrides too).")]
MoreArgs = Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", help="More overrides.",
                                                         show_default=False)]
RomDirOpt = Annotated[Optional[Path], typer.Option(help="Directory of Jericho ROMs (default: $PRIORZERO_ROM_DIR).")]


def _overrides(set_: Optional[list[str]], more: Optional[list[str]]) -> list[str]:
    items = [*(set_ or []), *(more or [])]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
    return items


def _prefect_server_up(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=0.5):
            return True
    except OSError:
        return False


def connect_prefect(require_server: bool) -> None:
    """Point Prefect at $PREFECT_API_URL, or a local server on its default port, or else its ephemeral API.

    Must run before Prefect is imported: Prefect reads its settings once, at import.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry errors
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "priorzero")  # trainer log lines in the Prefect UI
    # Prefect gives its temporary server 20 s (of sleeps, not counting the health checks) to come up: on a loaded
    # machine (a test suite, a second run) it takes longer, and the run would die before its first iteration.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if "PREFECT_API_URL" not in os.environ and _prefect_server_up(LOCAL_PREFECT_API):
        # Two servers on one sqlite file is what makes "database is locked": use the running one.
        os.environ["PREFECT_API_URL"] = LOCAL_PREFECT_API
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    if require_server:
        raise PriorZeroError("no Prefect server: start one with `prefect server start --host 127.0.0.1` "
                             f"and export PREFECT_API_URL={LOCAL_PREFECT_API}")
    typer.echo("no Prefect server configured: using Prefect's ephemeral API (a temporary server on "
               "$PREFECT_HOME/prefect.db, ≈6 s to start); run `prefect server start --host 127.0.0.1` to watch "
               "runs live", err=True)
    from priorzero.flows.server_watchdog import watch_temporary_servers

    watch_temporary_servers()  # the temporary server stops when this process dies, even by kill -9


def _run_flow(**params: object) -> None:
    connect_prefect(require_server=False)
    from priorzero.flows.priorzero_flow import priorzero

    summary = priorzero(**params)
    typer.echo(f"run dir {summary['run_dir']}: trained to iteration {summary['last_iteration']}"
               + (f", failed iterations {summary['failed_iterations']}" if summary["failed_iterations"] else "")
               + (f"; MLflow run {summary['mlflow_run_id']}" if summary["mlflow_run_id"] else ""))


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="A config name in configs/ (debug, zork, detective) or a YAML path.")],
    more: MoreArgs = None,
    set_: SetOpt = None,
    iterations: Annotated[Optional[int], typer.Option(
        help="Train up to this iteration (default: schedule.iterations).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(
        help="The run directory (default: run.run_dir/<config>-<time>).")] = None,
) -> None:
    """Train with the priorzero flow in this process; no Prefect server needed."""
    from priorzero_core.config import load_config
    from priorzero_core.preflight import check_inputs

    overrides = _overrides(set_, more)
    check_inputs(load_config(config, overrides))  # bad input fails here, in one line, before Prefect starts
    run_name = None
    if run_dir is not None:
        overrides.append(f"run.run_dir={run_dir.resolve().parent}")
        run_name = run_dir.name
    _run_flow(config=config, overrides=overrides, iterations=iterations, run_name=run_name)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `priorzero train`.")],
    more: MoreArgs = None,
    set_: SetOpt = None,
    iterations: Annotated[Optional[int], typer.Option(help="Train up to this iteration (default: the run's).")] = None,
) -> None:
    """Continue a run from its latest valid checkpoint, with its own config.yaml and MLflow run."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    overrides = [*_overrides(set_, more), f"run.run_dir={run_dir.resolve().parent}"]
    _run_flow(config=str(saved), overrides=overrides, iterations=iterations, resume=True, run_name=run_dir.name)


@app.command()
def serve(
    poll_seconds: Annotated[float, typer.Option(help="How often to look for new runs; this is most of a run's "
                                                     "start latency (Prefect's default: 10).")] = 10.0,
    limit: Annotated[Optional[int], typer.Option(help="At most this many flow runs at once.")] = None,
) -> None:
    """Serve deployments priorzero/zork, priorzero/detective and priorzero/debug from this process."""
    connect_prefect(require_server=True)
    from priorzero.flows.deployments import serve_deployments

    serve_deployments(poll_seconds=poll_seconds, limit=limit)


@app.command()
def deploy(
    pool: Annotated[str, typer.Option(help="The process work pool (made if missing).")] = "priorzero",
    working_dir: Annotated[Optional[Path], typer.Option(
        help="Where the flow runs work: their runs/ and mlruns/ (default: this directory).")] = None,
) -> None:
    """Register priorzero/zork, priorzero/detective and priorzero/debug with a process work pool; then start
    workers with `prefect worker start --pool POOL` and runs with `prefect deployment run priorzero/debug`."""
    connect_prefect(require_server=True)
    from priorzero.flows.deployments import DEPLOYMENTS, deploy_to_pool

    deploy_to_pool(pool, working_dir or Path.cwd())
    typer.echo(f"deployments {', '.join(f'priorzero/{n}' for n in DEPLOYMENTS)} in work pool {pool!r}; "
               f"start a worker: prefect worker start --pool {pool}")


@config_app.command("show")
def config_show(
    config: Annotated[str, typer.Argument(help="A config name in configs/ or a YAML path.")],
    more: MoreArgs = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved configuration (defaults, file and overrides) as YAML."""
    from priorzero_core.config import dump_config, load_config

    typer.echo(dump_config(load_config(config, _overrides(set_, more))), nl=False)


@app.command()
def games(rom_dir: RomDirOpt = None) -> None:
    """List the games: the embedded one and Jericho's, with max score and ROM path where found."""
    from rich.console import Console
    from rich.table import Table

    from priorzero_core.config import GameConfig
    from priorzero_core.games.catalog import list_games

    game_cfg = GameConfig(rom_dir=str(rom_dir) if rom_dir else None)
    table = Table("game", "max score", "ROM")
    for row in list_games(game_cfg.resolved_rom_dir(), game_cfg.embedded_seed):
        table.add_row(row.name, "" if row.max_score is None else str(row.max_score),
                      str(row.path) if row.path else "[dim]not found[/dim]")
    Console().print(table)


@app.command()
def play(
    game: Annotated[str, typer.Argument(help="'embedded', a Jericho game name (zork1, detective, ...) or a ROM path.")],
    rom_dir: RomDirOpt = None,
    seed: Annotated[int, typer.Option(help="Game seed.")] = 0,
) -> None:
    """Play a game in the terminal: type a command, or the number of a valid action; 'quit' ends."""
    from priorzero_core.config import GameConfig
    from priorzero_core.games import make_env

    env = make_env(GameConfig(name=game, rom_dir=str(rom_dir) if rom_dir else None), seed)
    try:
        step = env.reset()
        while True:
            typer.echo(f"\n{step.observation}\n\nscore {step.score}, moves {step.moves}")
            if step.done:
                typer.echo("You won." if step.won else "The game is over.")
                return
            typer.echo("valid actions: " + ", ".join(f"[{i}] {a}" for i, a in enumerate(step.valid_actions, 1)))
            try:
                command = input("> ").strip()
            except EOFError:
                return
            if command in {"quit", "q"}:
                return
            if command.isdigit() and 1 <= int(command) <= len(step.valid_actions):
                command = step.valid_actions[int(command) - 1]
            step = env.step(command)
    finally:
        env.close()


@app.command("eval")
def evaluate(
    run_dir: Annotated[str, typer.Argument(help="A run directory made by `priorzero train`, or a registered "
                                                "agent such as models:/priorzero-zork1@best.")],
    more: MoreArgs = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a run's latest checkpoint (or a registered agent) and print its metrics and transcript path.

    Overrides change only this evaluation (the run's config.yaml stays as it is), e.g. the random baseline
    over the same valid actions: `priorzero eval runs/zork eval.modes=\\[random] eval.num_episodes=20`.
    """
    if run_dir.startswith(("models:/", "runs:/")):
        result = _evaluate_registered(run_dir, _overrides(set_, more))
    else:
        from priorzero_core.config import load_config
        from priorzero_core.trainer import Trainer

        saved = Path(run_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
        trainer = Trainer(load_config(saved, _overrides(set_, more)), Path(run_dir), resume=True, readonly=True)
        try:
            result = trainer.evaluate(trainer.iteration)
        finally:
            trainer.close()
    for key, value in sorted(result.metrics.items()):
        typer.echo(f"{key} {value:.4g}")
    for key, path in result.artifacts.items():
        typer.echo(f"{key} {path}")


def registered_agent_dir(local: Path, uri: str) -> Path:
    """The exported agent inside a downloaded MLflow model: the directory its MLmodel names as the pyfunc artifact
    `agent` (what `mlflow.pyfunc.load_model` loads), or the model's one agent where no MLmodel names it."""
    import yaml

    from priorzero_core.agent_model import AGENT_FILE

    try:
        named = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]["agent"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        named = None
    if named is not None and (local / named / AGENT_FILE).is_file():
        return local / named
    found = sorted(p.parent for p in local.rglob(AGENT_FILE))
    if len(found) != 1:
        raise PriorZeroError(f"{uri} is not a PriorZero agent ({len(found)} {AGENT_FILE} in it"
                             f"{', and no MLmodel naming one' if found else ''})")
    return found[0]


def _evaluate_registered(uri: str, overrides: list[str]):
    """Download an agent logged by a run (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/agents/iter-NNNNNN)
    from the MLflow store ($MLFLOW_TRACKING_URI, else ./mlruns) and evaluate it; the transcript goes to
    ./transcripts/."""
    import tempfile
    import time

    import mlflow
    from mlflow.exceptions import MlflowException

    from priorzero.tasks.tracking import tracking_uri
    from priorzero_core.agent_model import evaluate_agent
    from priorzero_core.config import config_from_dict
    from priorzero_core.trainer import StageResult

    mlflow.set_tracking_uri(tracking_uri(config_from_dict({})))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as err:
            raise PriorZeroError(f"cannot load {uri} from {mlflow.get_tracking_uri()}: "
                                 f"{first_line(err)}") from None
        agent = registered_agent_dir(local, uri)
        transcript = Path("transcripts") / f"eval-{uri.split(':/', 1)[1].replace('/', '-').replace('@', '-')}-{int(time.time())}.txt"
        played = evaluate_agent(agent, overrides, transcript)
    return StageResult(metrics=played.metrics, artifacts={"transcript": transcript})


@app.command()
def bench(
    only: Annotated[Optional[list[str]], typer.Option(
        help="Run only this benchmark (repeatable): env_throughput, llm_scoring, mcts, mcts_peers, "
             "orchestration_overhead, ppo_throughput.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the ratio table as JSON here.")] = None,
) -> None:
    """Run the benchmarks (benchmarks/run_all.py) and print each ratio against its target."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise PriorZeroError(f"no {script}: the benchmarks live in the source checkout")
    cmd = [sys.executable, str(script), *(a for name in only or [] for a in ("--only", name))]
    raise typer.Exit(subprocess.run([*cmd, *(["--out", str(out)] if out else [])]).returncode)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    # SIGTERM (kill, systemd, a scheduler stopping the job) unwinds like Ctrl-C: the flow's cleanup closes envs,
    # workers and Ray, marks the MLflow run, and Prefect's ephemeral server stops, instead of being orphaned.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except PriorZeroError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        from priorzero.flows.priorzero_flow import TrainingFailed

        if not isinstance(err, TrainingFailed):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)

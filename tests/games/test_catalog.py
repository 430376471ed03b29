import shutil

import pytest

from priorzero_core.config import GameConfig
from priorzero_core.errors import GameError
from priorzero_core.games.catalog import EMBEDDED, game_spec, list_games, resolve_rom, supported_games


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_every_suite_rom_jericho_supports_is_listed_with_its_max_score(rom_dir):
    rows = {row.name: row for row in list_games(rom_dir, embedded_seed=1234)}
    assert rows["zork1"].max_score == 350 and rows["zork1"].path == rom_dir / "zork1.z5"
    assert rows["detective"].max_score == 360
    assert rows["sherbet"].path is None  # supported by Jericho, not in the suite
    assert rows[EMBEDDED].max_score == 10
    found = {row.name for row in rows.values() if row.path is not None} - {EMBEDDED}
    suite = {p.stem for p in rom_dir.iterdir()} - {"lgop"}  # lgop.z3 is a release Jericho does not support
    assert found == suite
    assert "lgop" not in supported_games()


def test_game_spec_fills_per_game_defaults_and_keeps_config_overrides(rom_dir):
    zork = game_spec(GameConfig(name="zork1", rom_dir=str(rom_dir)))
    assert (zork.action_space_size, zork.max_episode_steps, zork.max_score) == (55, 500, 350)
    other = game_spec(GameConfig(name="balances", rom_dir=str(rom_dir), max_episode_steps=7))
    assert (other.action_space_size, other.max_episode_steps) == (20, 7)


def test_a_rom_path_or_file_name_resolves_to_that_file(rom_dir):
    assert resolve_rom(GameConfig(name=str(rom_dir / "detective.z5"))) == rom_dir / "detective.z5"
    assert resolve_rom(GameConfig(name="detective.z5", rom_dir=str(rom_dir))) == rom_dir / "detective.z5"


def test_missing_rom_names_the_folder_searched_and_the_env_var(tmp_path):
    with pytest.raises(GameError) as err:
        resolve_rom(GameConfig(name="zork1", rom_dir=str(tmp_path)))
    message = _one_line(err)
    assert str(tmp_path) in message and "PRIORZERO_ROM_DIR" in message and "zork1.z5" in message


def test_no_rom_dir_configured_says_how_to_set_one(monkeypatch):
    monkeypatch.delenv("PRIORZERO_ROM_DIR", raising=False)
    with pytest.raises(GameError) as err:
        resolve_rom(GameConfig(name="zork1"))
    assert "game.rom_dir" in _one_line(err) and "PRIORZERO_ROM_DIR" in str(err.value)


def test_unknown_game_lists_supported_names_and_suggests_the_close_one(rom_dir):
    with pytest.raises(GameError) as err:
        resolve_rom(GameConfig(name="zrok1", rom_dir=str(rom_dir)))
    message = _one_line(err)
    assert "did you mean 'zork1'?" in message and "detective" in message


def test_truncated_rom_is_reported_with_its_size(rom_dir, tmp_path):
    cut = tmp_path / "zork1.z5"
    cut.write_bytes((rom_dir / "zork1.z5").read_bytes()[:40_000])
    for name in ("zork1", str(cut)):
        with pytest.raises(GameError) as err:
            resolve_rom(GameConfig(name=name, rom_dir=str(tmp_path)))
        assert "truncated" in _one_line(err) and str(cut) in str(err.value)


def test_a_file_that_is_not_a_z_machine_rom_is_refused(tmp_path):
    fake = tmp_path / "notes.z5"
    fake.write_text("these are my notes, not a story file\n" * 10)
    with pytest.raises(GameError) as err:
        resolve_rom(GameConfig(name=str(fake)))
    assert "not a Z-machine story file" in _one_line(err)


def test_an_unsupported_release_is_refused(rom_dir, tmp_path):
    other = tmp_path / "zork1.z3"
    shutil.copy(rom_dir / "lgop.z3", other)
    with pytest.raises(GameError) as err:
        resolve_rom(GameConfig(name=str(other)))
    assert "not a release Jericho supports" in _one_line(err)

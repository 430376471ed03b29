"""The package as a wheel: installed without -e, away from the checkout, it has its configs and commands."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installed_elsewhere_loads_the_shipped_configs(tmp_path):
    src = tmp_path / "src"  # a copy of what the wheel is built from, so the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("priorzero_core", "src"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("priorzero-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)

    code = ("import priorzero_core, priorzero.cli\n"
            "from priorzero_core.config import load_config\n"
            "print(priorzero_core.__file__)\n"
            "print(' '.join(load_config(n).game.name for n in ('debug', 'zork', 'detective')))\n")
    env = {k: v for k, v in os.environ.items() if k != "PRIORZERO_CONFIG_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(site))  # the installed copy, not the checkout
    # two top-level packages; the test/benchmark servers helper (scripts/servers.py) is not shipped
    assert sorted(p.name for p in site.iterdir() if (p / "__init__.py").is_file()) == ["priorzero", "priorzero_core"]
    assert not list(site.rglob("servers.py"))
    assert out[1] == "embedded zork1 detective"
    assert (site / "priorzero_core" / "configs" / "zork.yaml").read_text() == (ROOT / "configs" / "zork.yaml").read_text()


def test_the_flow_tasks_and_command_line_have_one_home():
    """From the checkout's root only `priorzero.flows` / `priorzero.tasks` / `priorzero.cli` import: no top-level
    `flows` or `tasks` beside them (a second copy would keep a second trainer registry)."""
    code = ("import importlib.util, priorzero.cli, priorzero.flows, priorzero.tasks\n"
            "print([m for m in ('flows', 'tasks', 'cli', 'servers') if importlib.util.find_spec(m)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


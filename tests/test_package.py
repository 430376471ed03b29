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
    for name in ("priorzero_core", "flows", "tasks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("priorzero-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)

    code = ("import priorzero_core, priorzero.flows.cli\n"
            "from priorzero_core.config import load_config\n"
            "print(priorzero_core.__file__)\n"
            "print(' '.join(load_config(n).game.name for n in ('debug', 'zork', 'detective')))\n")
    env = {k: v for k, v in os.environ.items() if k != "PRIORZERO_CONFIG_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(site))  # the installed copy, not the checkout
    assert out[1] == "embedded zork1 detective"
    assert (site / "priorzero_core" / "configs" / "zork.yaml").read_text() == (ROOT / "configs" / "zork.yaml").read_text()

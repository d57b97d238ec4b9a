"""An installed artscale (a built wheel, not the checkout) submits training and runs the training module.

A cluster installs artscale into a venv, a module or a container: the presets and sbatch scripts
travel inside the package, and the sbatch scripts launch `-m artscale.train`, not a file of the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from artscale.cluster.slurm import SBATCH_DIR
from artscale.train.presets import PRESETS_DIR

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(dest: Path) -> Path:
    """`pip wheel` of a copy of the sources (an in-tree build would leave build/ in the checkout,
    and a stale build/lib would ship files deleted since)."""
    src = dest / "src"
    shutil.copytree(ROOT / "artscale", src / "artscale", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (dest / "dist").glob("artscale-*.whl")
    return wheel


@pytest.mark.slow
def test_an_installed_wheel_submits_training_and_runs_the_module(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for folder in (PRESETS_DIR, SBATCH_DIR):
        shipped = sorted(p.name for p in folder.iterdir() if p.is_file())
        inside = folder.relative_to(ROOT).as_posix()
        assert shipped and all(f"{inside}/{name}" in names for name in shipped), (folder, names)
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH comes before the venv's own paths: the installed copy shadows the checkout's.
    # PATH without sinfo: submit fits nothing to the nodes and prints the line as it is.
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": str(Path(sys.executable).parent)}

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    where = python("-c", "import artscale.cluster.slurm as s; print(s.__file__)")
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    submitted = python("-m", "artscale", "submit", "train", "--config", "diffusion", "--dry-run")
    assert submitted.returncode == 0 and submitted.stderr == "", submitted.stderr
    line = submitted.stdout.split()
    assert line[0] == "sbatch" and line[-2:] == ["--config", "diffusion"], line
    script = Path(line[-3])
    assert script == site / "artscale" / "cluster" / "sbatch" / "train.sbatch" and script.is_file()
    assert "python -m artscale.cluster node" in script.read_text()
    helped = python("-m", "artscale.train", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: artscale train"), helped.stderr
    assert "--config" in helped.stdout

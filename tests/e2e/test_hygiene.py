"""Code-wide rules: texts users see cite only what users have, readers stay leaves, one size rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from artscale.core.errors import UserError
from artscale.core.system import multiple_of_8

ROOT = Path(__file__).resolve().parents[2]


def test_code_and_help_do_not_cite_files_users_lack():
    dirs = ("artscale", "bench", "launch", "slurm", "tests")  # artscale/ holds the presets and sbatch scripts
    files = [p for d in dirs for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".yaml", "")]
    files += [ROOT / "pyproject.toml", *(ROOT / "tools").glob("*.py")]
    bad = [
        f"{p.relative_to(ROOT)}"
        for p in files
        if any(s in p.read_text(errors="ignore") for s in ("DESIGN" + ".md", "FACTS" + ".md"))
    ]
    assert bad == []


def test_manifest_and_state_dict_readers_do_not_pull_in_pack_or_checkpoint():
    code = (
        "import sys, artscale.data.loader, artscale.train.losses; "
        "print(sorted(m for m in ('artscale.data.pack', 'artscale.contracts.run_dir', 'artscale.train.checkpoint') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("size", [-8, 0, 4, 12, 16, 24])
def test_every_size_check_agrees_with_multiple_of_8(size):
    """The CLI flags, the config, the model, pack and generate all refuse the same sizes."""
    import argparse

    from artscale.cli import positive_multiple_of_8
    from artscale.data.pack import PackSettings
    from artscale.models.article import check_size
    from artscale.train.config import load_config

    ok = multiple_of_8(size)
    assert ok == (size in (16, 24))
    refused = []
    for check in (
        lambda: positive_multiple_of_8(str(size)),
        lambda: load_config(None, [f"image_size={size}"]),
        lambda: check_size(size, size),
        lambda: PackSettings(size, 0.1, [], "stretch", "jpg", 95, 1, 0, False, 10, 0),
    ):
        try:
            check()
        except (UserError, argparse.ArgumentTypeError):
            refused.append(True)
        else:
            refused.append(False)
    assert refused == [not ok] * 4

"""The packaged presets: `--config NAME` in the one loader, `artscale configs [show NAME]`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from artscale.core.errors import UserError
from artscale.train.config import load_config
from artscale.train.presets import PRESETS_DIR, preset_names, resolve_config

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def test_the_presets_ship_inside_the_package():
    assert PRESETS_DIR == ROOT / "artscale" / "train" / "configs"
    assert preset_names() == ["article", "diffusion", "diffusion-cpu", "distill-cpu"]


@pytest.mark.parametrize("given", ["diffusion-cpu", "diffusion-cpu.yaml", "configs/diffusion-cpu.yaml"])
def test_a_name_or_the_old_checkout_path_finds_the_preset(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near a checkout
    assert resolve_config(given) == PRESETS_DIR / "diffusion-cpu.yaml"
    cfg = load_config(given, ["max_steps=3"])
    assert (cfg.objective, cfg.image_size, cfg.max_steps) == ("diffusion", 32, 3)


def test_a_path_that_exists_wins_over_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "article.yaml").write_text("batch_size: 5\n")
    (tmp_path / "diffusion").write_text("batch_size: 6\n")
    assert load_config("configs/article.yaml").batch_size == 5
    assert load_config("diffusion").batch_size == 6
    assert load_config("article").batch_size == 32


@pytest.mark.parametrize("given", ["articel", "elsewhere/article.yaml", "configs/nope.yaml"])
def test_neither_a_file_nor_a_preset_is_one_line_naming_the_presets(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_config(given)
    assert str(e.value) == (
        f"config {given} is neither a file nor a preset; presets: article, diffusion, diffusion-cpu, distill-cpu "
        "(artscale configs lists them)"
    )


def test_configs_lists_and_shows_the_presets(tmp_path, run_cli):
    listed = run_cli("configs", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == preset_names()
    assert lines[0].split(None, 1)[1] == (PRESETS_DIR / "article.yaml").read_text().splitlines()[0].lstrip("# ")
    assert "artscale configs show NAME" in lines[-1]
    shown = run_cli("configs", "show", "diffusion", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == (PRESETS_DIR / "diffusion.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(shown.stdout)  # the copy to edit loads as the preset does
    assert load_config(tmp_path / "mine.yaml") == load_config("diffusion")
    assert yaml.safe_load(shown.stdout)["objective"] == "diffusion"
    missing = run_cli("configs", "show", "difusion", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and missing.stdout == ""
    assert "no preset named difusion; presets: article, diffusion, diffusion-cpu, distill-cpu" in missing.stderr


def test_submit_takes_a_preset_name(tmp_path, run_cli):
    env = {"PATH": str(VENV_BIN)}  # no sinfo: submit fits nothing to the nodes and says nothing
    submitted = run_cli("submit", "train", "--config", "diffusion-cpu", "--dry-run", cwd=tmp_path, env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.split()[-2:] == ["--config", "diffusion-cpu"]  # the job's loader resolves it too

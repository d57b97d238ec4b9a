"""`artscale generate` with a diffusion denoiser: img2img variations of a tree (real sessions, real files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artscale.core.errors import UserError
from artscale.export.article import export_onnx
from artscale.infer.generate import generate


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory, make_diffusion_run):
    root = tmp_path_factory.mktemp("variations")
    export_onnx(make_diffusion_run(root / "run"), root / "m.onnx")
    return root / "m.onnx"


def tree(root: Path, seed: int) -> Path:
    """Training-size (16 px) PNGs in class folders, and one folder that names no class."""
    rng = np.random.default_rng(seed)
    for rel in ("cubism/a.png", "cubism/b.png", "ukiyo-e/c.png", "baroque/d.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / rel)
    return root


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
def test_strength_zero_keeps_the_input_and_one_ignores_it(denoiser, tmp_path):
    a = tree(tmp_path / "a", 0)
    tree(tmp_path / "b", 1)  # the same names, other pixels
    kw = dict(device="cpu", variation={"class_name": "cubism", "steps": 4})
    generate(denoiser, a, tmp_path / "zero", **{**kw, "variation": {**kw["variation"], "strength": 0.0}})
    for rel in ("cubism/a.png", "baroque/d.png"):
        assert np.array_equal(pixels(tmp_path / "zero" / rel), pixels(a / rel))  # PNG: lossless
    for src in ("a", "b"):
        generate(
            denoiser,
            tmp_path / src,
            tmp_path / f"one-{src}",
            **{**kw, "variation": {**kw["variation"], "strength": 1.0}},
        )
    for rel in ("cubism/a.png", "ukiyo-e/c.png"):
        assert (tmp_path / "one-a" / rel).read_bytes() == (tmp_path / "one-b" / rel).read_bytes()
        assert not np.array_equal(pixels(tmp_path / "one-a" / rel), pixels(a / rel))
    half = generate(denoiser, a, tmp_path / "half", **{**kw, "variation": {**kw["variation"], "strength": 0.5}})
    assert half["variation"]["strength"] == 0.5 and half["variation"]["sampler"] == "dpm++"
    moved = np.abs(pixels(tmp_path / "half" / "cubism/a.png") - pixels(a / "cubism/a.png")).mean()
    assert 0 < moved < np.abs(pixels(tmp_path / "one-a" / "cubism/a.png") - pixels(a / "cubism/a.png")).mean()


@pytest.mark.slow
def test_class_from_parent_skips_and_counts_a_folder_that_names_no_class(denoiser, tmp_path, run_cli):
    src = tree(tmp_path / "in", 0)
    result = run_cli(
        "generate",
        denoiser,
        src,
        tmp_path / "out",
        "--class-from-parent",
        "--strength",
        "0.5",
        "--steps",
        "3",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["written"], report["skipped"]) == (3, 1)
    assert report["skipped_files"] == [
        {"path": "baroque/d.png", "reason": "parent folder 'baroque' is not one of the model's classes"}
    ]
    assert not (tmp_path / "out" / "baroque").exists()
    with pytest.raises(UserError, match="not one of the model's classes"):
        generate(denoiser, src, tmp_path / "x", device="cpu", variation={"class_name": "baroque"})


def test_variation_flags_with_the_articles_model_are_refused(tmp_path, make_run_dir, run_cli):
    export_onnx(make_run_dir(tmp_path / "run"), tmp_path / "art.onnx")
    src = tree(tmp_path / "in", 0)
    result = run_cli("generate", tmp_path / "art.onnx", src, tmp_path / "out", "--strength", "0.3", "--device", "cpu")
    assert result.returncode == 2 and "for a diffusion model" in result.stderr

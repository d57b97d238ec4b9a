"""Shared fixtures: a tiny config, a tiny image folder. Every test uses random VGG weights
(pretrained ones cannot be downloaded here) and says so through vgg_weights=random.

The GPU is hidden from every run that does not select the `gpu` tests alone (`pytest -m gpu`):
on a GPU host the other tests would otherwise meet CUDA providers, cuDNN's non-bit-exact kernels
and CUDA generators, and pass or fail differently than on CPU.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CLASSES = ["drawings", "engraving", "iconography", "painting", "sculpture"]

# Mark sets a test can carry, with and without `gpu`: what an -m expression is tried on.
_OTHER_MARKS = ({"slow"}, {"slurm"}, {"slow", "slurm"})


def gpu_selected(markexpr: str) -> bool:
    """Whether the -m expression runs the gpu tests alone: it selects a test marked gpu and no test
    without that mark. An empty or unreadable expression selects everything: not alone."""
    if not markexpr.strip():
        return False
    from _pytest.mark.expression import Expression

    try:
        expr = Expression.compile(markexpr)
    except Exception:  # pytest reports the bad expression itself
        return False

    def selects(marks: set[str]) -> bool:
        return expr.evaluate(lambda name, **kwargs: name in marks)

    plain = [set(), *_OTHER_MARKS]
    return any(selects({"gpu"} | m) for m in plain) and not any(selects(m) for m in plain)


def pytest_configure(config) -> None:
    """Hide the GPU, before torch or onnxruntime look for one, unless this run is `-m gpu`. An empty
    CUDA_VISIBLE_DEVICES hides it from this process and its subprocesses (and asks for no GPU)."""
    if gpu_selected(config.getoption("markexpr") or ""):
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise pytest.UsageError("CUDA was initialised before tests/conftest.py could hide the GPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_runtest_setup(item) -> None:
    """A gpu test runs only in a `-m gpu` run that sees a CUDA device; anywhere else it is skipped."""
    if item.get_closest_marker("gpu") is None:
        return
    if not gpu_selected(item.config.getoption("markexpr") or ""):
        pytest.skip("the GPU is hidden from runs that mix gpu tests with others: run them alone, `pytest -m gpu`")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: torch sees no CUDA device")


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the real `artscale` console script in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(VENV_BIN / "artscale"), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_image(path: Path, size: tuple[int, int], seed: int, fmt: str | None = None) -> Path:
    """A small structured image (gradients + blocks), so resizing and the model have something to see."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, 3)
    arr = np.stack(
        [
            (xx * 255 // max(w - 1, 1) + base[0]) % 256,
            (yy * 255 // max(h - 1, 1) + base[1]) % 256,
            ((xx + yy) * 3 + base[2]) % 256,
        ],
        axis=-1,
    ).astype(np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, max(w // 2, 1)), rng.integers(0, max(h // 2, 1))
        arr[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, fmt)
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """5 classes x 8 images of mixed sizes and formats, plus one corrupt file and one junk file."""
    root = tmp_path_factory.mktemp("collection")
    rnd = random.Random(0)
    for ci, cls in enumerate(CLASSES):
        for i in range(8):
            ext = "jpg" if i % 3 else "png"
            make_image(root / cls / f"{cls}_{i}.{ext}", (rnd.randint(24, 96), rnd.randint(24, 96)), seed=ci * 100 + i)
    (root / "painting" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "drawings" / ".DS_Store").write_bytes(b"\x00\x01junk")
    return root


def tiny(run_dir: Path, shards_dir: Path, *extra: str) -> list[str]:
    """key=value overrides for a seconds-long CPU run (random VGG weights: no download in tests);
    `extra` come last, so they win."""
    return [
        f"data={shards_dir}",
        f"run_dir={run_dir}",
        "image_size=16",
        "batch_size=4",
        "vgg_weights=random",
        "tracker=none",
        "num_workers=0",
        "log_every=1",
        "sample_every=1000",
        "val_every=1000",
        "checkpoint_every=1000",
        "pg_timeout_s=120",
        *extra,
    ]

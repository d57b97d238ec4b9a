"""Benchmark: training images/s of artscale's loop against the article's loop, same model, loss and batch.

The article's loop is written plainly here: fp32, contiguous tensors, model + VGG16 features[:16]
hybrid loss + Adam, on a batch already in memory (no data loading: that favours the article).
artscale's figure is the real thing: `artscale train` on shards packed from the same kind of
images, read from its metrics.jsonl (img/s of optimizer steps after the first), with
mixed_precision=no and =bf16, num_workers=0 (the article's loop has its batch in memory; on 2 cores a
loader worker only takes CPU from the step). artscale keeps freed memory in the process on CPU
(train.keep_freed_memory); the article's loop runs as written. VGG weights are random in both
(same compute; no download).
Prints one JSON line. Run: .venv/bin/python bench/train_step.py [--steps 2] [--batch-size 32] [--size 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from artscale.losses import load_vgg_features  # noqa: E402
from artscale.model import ConvDiffusionModel, normalize  # noqa: E402


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def article_loop(steps: int, batch: int, size: int) -> float:
    """img/s of the article's step (after one warm-up step)."""
    torch.manual_seed(0)
    model, vgg = ConvDiffusionModel(), load_vgg_features("random")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(batch, 3, size, size)
    x, target = normalize(images), images
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        out = model(x)
        loss = F.mse_loss(out, target) + F.mse_loss(vgg(normalize(out)), vgg(normalize(target)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[1:])


def make_shards(root: Path, n: int, size: int) -> Path:
    from artscale.shards import pack

    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / "src" / ("a", "b")[i % 2] / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
        small.resize((int(rng.integers(300, 800)), int(rng.integers(300, 800))), Image.Resampling.BICUBIC).save(
            path, quality=90
        )
    pack(root / "src", root / "shards", size=size, val_fraction=0.0, workers=1, shard_max_count=8)
    return root / "shards"


def artscale_loop(shards: Path, run_dir: Path, steps: int, batch: int, size: int, precision: str) -> float:
    """img/s of `artscale train` steps after the first, from its metrics.jsonl."""
    cmd = [
        str(Path(sys.executable).parent / "artscale"),
        "train",
        f"data={shards}",
        f"run_dir={run_dir}",
        f"image_size={size}",
        f"batch_size={batch}",
        f"max_steps={steps + 1}",
        "vgg_weights=random",
        "tracker=none",
        "num_workers=0",
        "log_every=1",
        "val_every=100000",
        "sample_every=100000",
        "checkpoint_every=100000",
        f"mixed_precision={precision}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    rates = [json.loads(line)["img_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument(
        "--images", type=int, default=160, help="images packed into the shards (an epoch is images / batch steps)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line only
        shards = make_shards(Path(tmp), args.images, args.size)
        article = article_loop(args.steps, args.batch_size, args.size)
        fp32 = artscale_loop(shards, Path(tmp) / "fp32", args.steps, args.batch_size, args.size, "no")
        bf16 = artscale_loop(shards, Path(tmp) / "bf16", args.steps, args.batch_size, args.size, "bf16")
    print(
        json.dumps(
            {
                "bench": "train_step",
                "batch_size": args.batch_size,
                "image_size": args.size,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "cpu_bf16": cpu_has_bf16(),
                "device": "cpu",
                "article_img_s": round(article, 2),
                "artscale_fp32_img_s": round(fp32, 2),
                "artscale_bf16_img_s": round(bf16, 2),
                "fp32_speedup": round(fp32 / article, 2),
                "bf16_speedup": round(bf16 / article, 2),
            }
        )
    )


if __name__ == "__main__":
    main()

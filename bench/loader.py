"""Benchmark: training-data images/s of artscale's shard loader against the article's per-file loading.

Same source images for both: bench/pack.py's art-like JPEGs (300-2400 px). The article's way, per file: open + verify(), reopen, full decode to
RGB, torchvision Resize + ToTensor + Normalize, stacked into batches. artscale's: the webdataset
train pipeline over shards that `artscale pack` wrote from those files (packing is a one-time
cost, reported apart), batches of the same size, in the training process (num_workers=0, the same single core as the
article's), then with DataLoader workers; timed in steady state after the first batch (the time
to the first batch is reported apart). Prints one JSON line.
Run: .venv/bin/python bench/loader.py [--images 160] [--batches 40] [--batch-size 32] [--size 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack import make_collection  # noqa: E402  the same art-like JPEGs (300-2400 px) as bench/pack.py

from artscale.data.loader import data_spec, train_loader  # noqa: E402
from artscale.data.pack import pack  # noqa: E402


def article_way(paths: list[Path], batch: int, size: int) -> float:
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    t = time.perf_counter()
    n = 0
    for i in range(0, len(paths) - batch + 1, batch):
        tensors = []
        for p in paths[i : i + batch]:
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                tensors.append(tf(im.convert("RGB")))
        n += len(torch.stack(tensors))
    return n / (time.perf_counter() - t)


def artscale_way(shards: Path, batches: int, batch: int, size: int, workers: int) -> tuple[float, float]:
    """(steady img/s after the first batch, seconds to the first batch). The stream is resampled
    and endless, as in training, so it can run more batches than there are files."""
    spec = data_spec(str(shards), size)
    loader = train_loader(spec, batch_size=batch, epoch_batches=batches + 1, seed=0, rank=0, num_workers=workers)
    t = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t
    t = time.perf_counter()
    n = sum(len(images) for images, _, _, _ in itertools.islice(it, batches))
    return n / (time.perf_counter() - t), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="artscale batches timed after the first")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second artscale figure")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_collection(Path(tmp) / "src", args.images)
        t = time.perf_counter()
        pack(Path(tmp) / "src", Path(tmp) / "shards", size=args.size, val_fraction=0.0, workers=1, shard_max_count=20)
        pack_s = time.perf_counter() - t
        article = article_way(paths, args.batch_size, args.size)
        ours, first = artscale_way(Path(tmp) / "shards", args.batches, args.batch_size, args.size, 0)
        ours_workers, _ = artscale_way(Path(tmp) / "shards", args.batches, args.batch_size, args.size, args.workers)
    print(
        json.dumps(
            {
                "bench": "loader",
                "images": args.images,
                "batch_size": args.batch_size,
                "image_size": args.size,
                "article_img_s": round(article, 1),
                "artscale_img_s": round(ours, 1),
                f"artscale_{args.workers}_workers_img_s": round(ours_workers, 1),
                "speedup": round(ours / article, 2),
                "artscale_first_batch_s": round(first, 2),
                "target_speedup": 20,
                "pack_once_s": round(pack_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

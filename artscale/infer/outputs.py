"""Output files of generate and sample: image formats, written whole or not at all, and the reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from artscale.core.atomic import write_atomic, write_json_atomic
from artscale.core.errors import UserError
from artscale.data.images import encode_image, resize_image

TMP_SUFFIX = ".artscale-tmp"
EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def write_image(path: Path, pixels: np.ndarray, original: tuple[int, int] | None, fmt: str, quality: int) -> None:
    im = Image.fromarray(pixels, "RGB")
    if original and im.size != original:
        im = resize_image(im, original)
    data = encode_image(im, fmt, quality)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")  # one name per output: a rerun overwrites a stale one
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, tmp=tmp)
    except OSError as e:  # a full disk, a quota, a read-only mount: the run stops, what is written stays
        raise UserError(
            f"cannot write {path}: {e.strerror or e}; the outputs written so far are kept, run again to continue"
        ) from None


def report_name(num_shards: int, shard_index: int) -> str:
    return "report.json" if num_shards == 1 else f"report-{shard_index}-of-{num_shards}.json"


def write_report(out_dir: Path, report: dict) -> Path:
    """report.json (report-I-of-K.json for a shard), written atomically."""
    path = out_dir / report_name(report["num_shards"], report["shard_index"])
    write_json_atomic(path, report, sort_keys=False, tmp=out_dir / f".{path.name}{TMP_SUFFIX}")
    return path

"""Fixtures of the export tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def val_shards() -> Callable[[Path, int, int], Path]:
    """A shards dir as `artscale pack` writes it (manifest + val tar of jpg/png samples): the parity gate's images."""

    def write(root: Path, size: int, count: int) -> Path:
        root.mkdir()
        with tarfile.open(root / "val-000000.tar", "w") as tar:
            for i in range(count):
                arr = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "PNG")
                for name, data in ((f"s{i:03d}.png", buf.getvalue()), (f"s{i:03d}.cls", b"1")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tar_bytes = (root / "val-000000.tar").read_bytes()
        sha = hashlib.sha256(tar_bytes).hexdigest()
        manifest = {
            "classes": ["painting"],
            "image_size": size,
            "image_format": "png",
            "shards": [
                {"name": "val-000000.tar", "split": "val", "count": count, "bytes": len(tar_bytes), "sha256": sha}
            ],
            "splits": {"train": {"count": 0, "shards": 0}, "val": {"count": count, "shards": 1}},
        }
        (root / "manifest.json").write_text(json.dumps(manifest))
        return root

    return write

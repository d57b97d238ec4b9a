"""artscale.shards: real folders packed into real tars, read back with tarfile and webdataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from artscale.shards import pack, read_manifest, verify
from conftest import CLASSES


def _members(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of a tar read with plain tarfile: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_pack_image_folder_reads_back_with_tarfile_and_webdataset(image_folder, tmp_path):
    import webdataset as wds

    out = tmp_path / "shards"
    m = pack(image_folder, out, size=16, val_fraction=0.25, workers=1, shard_max_count=8)
    assert m["classes"] == CLASSES and m["image_size"] == 16 and m["image_format"] == "jpg"
    assert m["per_class"]["painting"] == {"seen": 9, "packed": 8, "skipped": 1, "ignored": 0}
    assert m["per_class"]["drawings"] == {"seen": 9, "packed": 8, "skipped": 0, "ignored": 1}
    assert [s["reason"].split(":")[0] for s in m["skipped"]] == ["truncated or corrupt"]
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 40
    assert m["splits"]["val"]["count"] > 0 and m["splits"]["train"]["shards"] >= 4
    assert read_manifest(out) == m and verify(out) == []
    seen = {}
    for s in m["shards"]:
        samples = _members(out / s["name"])
        assert len(samples) == s["count"]
        for key, fields in samples.items():
            assert "." not in key and set(fields) == {"jpg", "cls", "json"}
            meta = json.loads(fields["json"])
            assert int(fields["cls"]) == CLASSES.index(meta["class"])
            assert Image.open(io.BytesIO(fields["jpg"])).size == (16, 16)
            seen[key] = meta["path"]
    assert len(seen) == 40
    urls = [str(out / s["name"]) for s in m["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert sorted(r["__key__"] for r in read) == sorted(seen)
    assert all(set(r) >= {"jpg", "cls", "json"} for r in read)

"""The webdataset pipelines over real shards packed by `artscale pack` (16 px, uneven shard sizes)."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch

from artscale.core.errors import UserError
from artscale.data.loader import SkipCounter, data_spec, shard_images, train_loader, val_loader


def keys(loader, n: int | None = None) -> list[list[str]]:
    return [batch[2] for batch in itertools.islice(loader, n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_exactly_the_batches_asked_for(shards, workers, manifest):
    spec = data_spec(str(shards), 16)
    sizes = [s["count"] for s in manifest(shards)["shards"] if s["split"] == "train"]
    assert len(set(sizes)) > 1, "the shards must be uneven for this test to mean anything"
    per_rank = []
    classes = manifest(shards)["classes"]
    for rank in (0, 1):
        loader = train_loader(spec, batch_size=4, epoch_batches=3, seed=0, rank=rank, num_workers=workers)
        batches = list(itertools.islice(loader, 9))  # more than one pass over the train split: it never runs dry
        assert all(b[0].shape == (4, 3, 16, 16) and b[0].dtype == torch.uint8 for b in batches)
        assert all(b[1].shape == (4,) and b[1].dtype == torch.int64 for b in batches)
        labels = torch.cat([b[1] for b in batches])
        assert 0 <= labels.min() and labels.max() < len(classes) and len(set(labels.tolist())) > 1
        per_rank.append([k for b in batches for k in b[2]])
    assert per_rank[0] != per_rank[1]  # each rank its own seed


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_is_a_function_of_seed_epoch_rank_so_resume_skips_exactly(shards, workers):
    spec = data_spec(str(shards), 16)
    opts = dict(batch_size=4, seed=3, rank=1, num_workers=workers, epoch_batches=5)
    full = keys(train_loader(spec, **opts), 17)  # over three epoch boundaries
    assert full == keys(train_loader(spec, **opts), 17)
    for start in (3, 5, 8):  # mid-epoch, at a boundary, another worker's turn
        assert keys(train_loader(spec, start=start, **opts), 17 - start) == full[start:]
    assert full[:5] != full[5:10]  # each epoch its own order


def test_loader_workers_start_once_not_at_epoch_boundaries(shards, children):
    spec = data_spec(str(shards), 16)
    batches = iter(train_loader(spec, batch_size=4, epoch_batches=3, seed=0, rank=0, num_workers=2))
    next(batches)
    workers = set(children(os.getpid()))
    assert len(workers) == 2
    for _ in range(10):  # three epoch boundaries
        next(batches)
        assert set(children(os.getpid())) == workers


def test_hflip_is_decided_per_sample_not_per_position(shards):
    spec = data_spec(str(shards), 16)

    def images(**kw) -> dict:
        loader = train_loader(spec, batch_size=4, epoch_batches=6, seed=0, rank=0, **kw)
        return {k: x for imgs, _, ks, _ in itertools.islice(loader, 6) for k, x in zip(ks, imgs)}

    plain, flipped = images(), images(hflip=True)
    assert plain.keys() == flipped.keys()
    n_flipped = sum(not torch.equal(plain[k], flipped[k]) for k in plain)
    assert all(torch.equal(plain[k], flipped[k]) or torch.equal(plain[k].flip(-1), flipped[k]) for k in plain)
    assert 0 < n_flipped < len(plain)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 4)])
def test_val_ranks_get_disjoint_parts_that_cover_the_split(shards, world, workers, manifest):
    spec = data_spec(str(shards), 16)
    parts = [
        [k for b in val_loader(spec, batch_size=3, rank=r, world=world, num_workers=workers) for k in b[2]]
        for r in range(world)
    ]
    seen = [k for part in parts for k in part]
    assert len(seen) == len(set(seen)) == manifest(shards)["splits"]["val"]["count"] > 0
    assert max(map(len, parts)) - min(map(len, parts)) <= len(spec.val_urls)  # each rank a fair share


def test_a_corrupt_shard_is_skipped_and_counted_not_fatal(shards, tmp_path, manifest):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    first = next(s["name"] for s in manifest(bad)["shards"] if s["split"] == "train")
    data = bytearray((bad / first).read_bytes())
    data[1024:3072] = b"\x5a" * 2048  # a torn middle: headers and image bytes both garbage
    (bad / first).write_bytes(bytes(data))
    spec = data_spec(str(bad), 16)
    batches = list(itertools.islice(train_loader(spec, batch_size=4, epoch_batches=12, seed=0, rank=0), 12))
    assert sum(b[3] for b in batches) > 0


def test_shard_images_skips_and_counts_what_training_would_skip(tmp_path):
    """The one decoder behind training, FID and export's parity images: a sample that does not decode,
    one of another size and one without an image are counted, the rest read in order with their class."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    def png(size: int, value: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    members = [("a.png", png(16, 10)), ("a.cls", b"1"), ("b.png", b"not an image"), ("c.png", png(8, 0))]
    members += [("d.json", b"{}"), ("e.png", png(16, 20))]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counter = SkipCounter()
    found = list(shard_images([str(tmp_path / "s.tar")], counter, size=16))
    assert [(int(im[0, 0, 0]), label) for im, label in found] == [(10, 1), (20, -1)] and counter.count == 3
    evens = shard_images([str(tmp_path / "s.tar")], SkipCounter(), size=16, rank=0, world=2)  # a, c, e
    assert [label for _, label in evens] == [1, -1]


def test_bad_data_is_one_clear_error(shards, tmp_path):
    with pytest.raises(UserError, match="not a shards directory"):
        data_spec(str(tmp_path / "nope"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manifest.json"):
        data_spec(str(tmp_path / "empty"), 16)
    with pytest.raises(UserError, match="holds 16 px images but image_size=32"):
        data_spec(str(shards), 32)
    gone = tmp_path / "gone"
    shutil.copytree(shards, gone)
    victim = next(gone.glob("train-*.tar"))
    victim.unlink()
    with pytest.raises(UserError, match=f"shard {victim.name} listed in manifest.json is missing"):
        data_spec(str(gone), 16)
    with pytest.raises(UserError, match="2 of 2 shards not found"):
        data_spec(str(tmp_path / "x-{0..1}.tar"), 16)


def test_a_url_pattern_whose_images_never_fit_is_an_error_not_a_hang(shards):
    spec = data_spec(str(shards / "train-{000000..000001}.tar"), 32)  # no manifest: checked per sample
    assert spec.train_count is None and spec.image_size == 32
    with pytest.raises(UserError, match="samples in a row could not be used .*expected 32x32"):
        next(iter(train_loader(spec, batch_size=4, epoch_batches=2, seed=0, rank=0)))

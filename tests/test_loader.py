"""The webdataset pipelines over real shards packed by `artscale pack` (16 px, uneven shard sizes)."""

from __future__ import annotations

import shutil

import pytest
import torch
from _train_helpers import manifest, shards  # noqa: F401  (fixture)

from artscale.errors import UserError
from artscale.loader import data_spec, train_loader, val_loader


def keys(loader) -> list[list[str]]:
    return [batch[1] for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_exactly_the_batches_asked_for(shards, workers):
    spec = data_spec(str(shards), 16)
    sizes = [s["count"] for s in manifest(shards)["shards"] if s["split"] == "train"]
    assert len(set(sizes)) > 1, "the shards must be uneven for this test to mean anything"
    per_rank = []
    for rank in (0, 1):
        batches = list(train_loader(spec, batch_size=4, batches=9, seed=0, epoch=0, rank=rank, num_workers=workers))
        assert len(batches) == 9  # more than one pass over the train split: the stream never runs dry
        assert all(b[0].shape == (4, 3, 16, 16) and b[0].dtype == torch.float32 for b in batches)
        assert all(0.0 <= b[0].min() and b[0].max() <= 1.0 for b in batches)
        per_rank.append([k for b in batches for k in b[1]])
    assert per_rank[0] != per_rank[1]  # each rank its own seed


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_is_a_function_of_seed_epoch_rank_so_resume_skips_exactly(shards, workers):
    spec = data_spec(str(shards), 16)
    opts = dict(batch_size=4, seed=3, rank=1, num_workers=workers)
    full = keys(train_loader(spec, batches=7, epoch=2, **opts))
    assert full == keys(train_loader(spec, batches=7, epoch=2, **opts))
    assert keys(train_loader(spec, batches=7, epoch=2, skip=3, **opts)) == full[3:]
    assert keys(train_loader(spec, batches=7, epoch=3, **opts)) != full


def test_hflip_is_decided_per_sample_not_per_position(shards):
    spec = data_spec(str(shards), 16)
    plain = {
        k: x
        for imgs, ks, _ in train_loader(spec, batch_size=4, batches=6, seed=0, epoch=0, rank=0)
        for k, x in zip(ks, imgs)
    }
    flipped = {
        k: x
        for imgs, ks, _ in train_loader(spec, batch_size=4, batches=6, seed=0, epoch=0, rank=0, hflip=True)
        for k, x in zip(ks, imgs)
    }
    assert plain.keys() == flipped.keys()
    n_flipped = sum(not torch.equal(plain[k], flipped[k]) for k in plain)
    assert all(torch.equal(plain[k], flipped[k]) or torch.equal(plain[k].flip(-1), flipped[k]) for k in plain)
    assert 0 < n_flipped < len(plain)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 4)])
def test_val_ranks_get_disjoint_parts_that_cover_the_split(shards, world, workers):
    spec = data_spec(str(shards), 16)
    parts = [
        [k for b in val_loader(spec, batch_size=3, rank=r, world=world, num_workers=workers) for k in b[1]]
        for r in range(world)
    ]
    seen = [k for part in parts for k in part]
    assert len(seen) == len(set(seen)) == manifest(shards)["splits"]["val"]["count"] > 0
    assert max(map(len, parts)) - min(map(len, parts)) <= len(spec.val_urls)  # each rank a fair share


def test_a_corrupt_shard_is_skipped_and_counted_not_fatal(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    first = next(s["name"] for s in manifest(bad)["shards"] if s["split"] == "train")
    data = bytearray((bad / first).read_bytes())
    data[1024:3072] = b"\x5a" * 2048  # a torn middle: headers and image bytes both garbage
    (bad / first).write_bytes(bytes(data))
    spec = data_spec(str(bad), 16)
    batches = list(train_loader(spec, batch_size=4, batches=12, seed=0, epoch=0, rank=0))
    assert len(batches) == 12
    assert sum(b[2] for b in batches) > 0


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
        next(iter(train_loader(spec, batch_size=4, batches=2, seed=0, epoch=0, rank=0)))

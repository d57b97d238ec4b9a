"""Streaming training data: webdataset pipelines over the shards `artscale pack` writes.

Train: shards are resampled per rank and DataLoader worker, seeded from (seed, epoch, rank,
worker), so every rank has an endless stream and runs exactly the same number of batches per
epoch. Uneven shards never leave one rank short (that hangs DDP: on CPU even
`join_uneven_inputs` does not save it). Because the stream is a pure function of those seeds,
a resumed run skips to the exact batch it stopped at. `accelerator.prepare` never sees these
loaders: it would shard them a second time.

Val: every rank reads every val shard and keeps samples rank, rank + W, ...: disjoint parts
however few val shards there are (webdataset's own node split would leave ranks empty).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from artscale.errors import UserError
from artscale.images import decode_bytes
from artscale.manifest import read_manifest

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")


@dataclass
class DataSpec:
    """Where the shards are and what the manifest says about them (counts are None for a bare URL pattern)."""

    train_urls: list[str]
    val_urls: list[str]
    train_count: int | None
    val_count: int | None
    image_size: int | None


def data_spec(data: str, image_size: int) -> DataSpec:
    """Check `data` (a shards dir with manifest.json, or a webdataset URL pattern) before training starts."""
    root = Path(data).expanduser()
    if root.is_dir():
        manifest = read_manifest(root)
        if manifest["image_size"] != image_size:
            raise UserError(
                f"data={data} holds {manifest['image_size']} px images but image_size={image_size}: "
                f"set image_size={manifest['image_size']} or pack again with --size {image_size}"
            )
        shards = {
            split: [s for s in manifest["shards"] if s["split"] == split and s["count"] > 0]
            for split in ("train", "val")
        }
        if not shards["train"]:
            raise UserError(
                f"data={data}: no train samples in its manifest (pack more images, or a smaller --val-fraction)"
            )
        for s in shards["train"] + shards["val"]:
            if not (root / s["name"]).is_file():
                raise UserError(
                    f"data={data}: shard {s['name']} listed in manifest.json is missing (run artscale verify {data})"
                )
        count = {split: sum(s["count"] for s in shards[split]) for split in shards}
        return DataSpec(
            [str(root / s["name"]) for s in shards["train"]],
            [str(root / s["name"]) for s in shards["val"]],
            count["train"],
            count["val"],
            image_size,
        )
    if "{" not in data and "::" not in data and "://" not in data and not data.startswith("pipe:"):
        raise UserError(f"data={data}: not a shards directory (make one with: artscale pack SRC {data})")
    urls = wds.shardlists.expand_urls(data)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise UserError(f"data={data}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
    return DataSpec(urls, [], None, None, image_size)  # no manifest: each sample is checked against image_size


class SkipCounter:
    """A webdataset handler: log what is skipped (a corrupt shard, a bad sample), count it, go on.
    A resampled stream never ends, so `limit` failures in a row without a batch is an error, not a hang."""

    def __init__(self, limit: int = 1000) -> None:
        self.count, self.in_a_row, self.limit = 0, 0, limit

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        self.in_a_row += 1
        log.warning("skipped corrupt data: %s", str(exn)[:300])
        if self.in_a_row >= self.limit:
            raise UserError(
                f"{self.limit} samples in a row could not be used (last: {str(exn)[:200]}); check the shards "
                "(artscale verify) and image_size"
            )
        return True

    def take(self) -> int:
        """Skips since the last batch (a batch came: the run is making progress)."""
        n, self.count, self.in_a_row = self.count, 0, 0
        return n


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _worker(skip: int = 0) -> tuple[int, int]:
    """(this DataLoader worker's role, workers). DataLoader takes batches from workers in turn,
    always starting at worker 0: after skipping `skip` batches, worker w plays the part that
    worker (w + skip) % W played in the uninterrupted run, so the batch order is the same."""
    info = get_worker_info()
    return ((info.id + skip) % info.num_workers, info.num_workers) if info else (0, 1)


def _worker_seed(rank: int, skip: int) -> int:
    return rank * 1000 + _worker(skip)[0]


def _shuffle(src: Iterator, bufsize: int, seed: int, epoch: int, rank: int, skip: int, initial: int = 100) -> Iterator:
    """A shuffle buffer seeded per rank, worker and epoch (webdataset's default seeds from the clock).
    It starts yielding at `initial` samples and grows to `bufsize`, so the first batch comes quickly."""
    rng = random.Random(_seed(seed, epoch, rank, _worker(skip)[0]))
    src = iter(src)
    buf: list = []
    for sample in src:
        buf.append(sample)
        if len(buf) < bufsize:
            buf.extend(itertools.islice(src, 1))
        if len(buf) >= initial:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _skip_batches(src: Iterator, batches: int, batch_size: int) -> Iterator:
    """Drop what this worker's role contributed to the first `batches` batches."""
    role, workers = _worker(batches)
    mine = max(0, (batches - role + workers - 1) // workers)
    return itertools.islice(src, mine * batch_size, None)


def _every_nth(src: Iterator, rank: int, world: int) -> Iterator:
    return itertools.islice(src, rank, None, world)


def _decode(sample: dict, size: int | None, flip_seed: int | None) -> tuple[torch.Tensor, str]:
    """A shard sample to a float [0, 1] CHW tensor; a wrong size raises (the handler counts it)."""
    key = sample.get("__key__", "?")
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f"sample {key} in {sample.get('__url__')} has no image")
    im = decode_bytes(data)
    if size is not None and im.size != (size, size):
        raise ValueError(
            f"sample {key} in {sample.get('__url__')} is {im.size[0]}x{im.size[1]}, expected {size}x{size}"
        )
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    if flip_seed is not None and _seed(flip_seed, key) & 1:  # a coin per (key, epoch): position-free, so resume-exact
        x = x.flip(-1)
    return x, key


def _collate(samples: list) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def _with_skips(src: Iterator, counter: SkipCounter) -> Iterator:
    """Each batch carries how many samples this worker skipped since its last batch."""
    for images, keys in src:
        yield images, keys, counter.take()


def train_loader(
    spec: DataSpec,
    *,
    batch_size: int,
    batches: int,
    seed: int,
    epoch: int,
    rank: int,
    num_workers: int = 0,
    skip: int = 0,
    hflip: bool = False,
    shuffle_buffer: int = 1000,
) -> wds.WebLoader:
    """Exactly `batches - skip` batches of (images, keys, skipped) for this rank's `epoch`."""
    counter = SkipCounter()
    size = spec.image_size
    pipeline = wds.DataPipeline(
        wds.ResampledShards(
            spec.train_urls, seed=_seed(seed, epoch), worker_seed=partial(_worker_seed, rank, skip), deterministic=True
        ),
        wds.tarfile_to_samples(handler=counter),
        wds.pipelinefilter(_shuffle)(shuffle_buffer, seed, epoch, rank, skip),
        wds.pipelinefilter(_skip_batches)(skip, batch_size),
        wds.map(partial(_decode, size=size, flip_seed=_seed(seed, epoch) if hflip else None), handler=counter),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
        wds.pipelinefilter(_with_skips)(counter),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    return loader.with_epoch(nbatches=batches - skip)


def val_loader(spec: DataSpec, *, batch_size: int, rank: int, world: int, num_workers: int = 0) -> wds.WebLoader | None:
    """This rank's disjoint part of the val split, once, as (images, keys, skipped); None without val shards."""
    if not spec.val_urls:
        return None
    counter = SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(
            spec.val_urls
        ),  # no node splitter: every rank reads every shard, `_every_nth` splits samples
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=counter),
        wds.pipelinefilter(_every_nth)(rank, world),
        wds.map(partial(_decode, size=spec.image_size, flip_seed=None), handler=counter),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
        wds.pipelinefilter(_with_skips)(counter),
    )
    # Fewer shards than workers would leave workers empty (webdataset's empty_check raises): cap them.
    return wds.WebLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(spec.val_urls)))

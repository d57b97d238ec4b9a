"""Streaming training data: webdataset pipelines over the shards `artscale pack` writes.

Batches are (images uint8 [N, 3, H, W], labels int64 [N], keys, skipped): uint8 is a quarter of
the bytes of float through worker shared memory and the pin thread; train.py converts on the
device. `labels` is the class index `artscale pack` stores per sample (`.cls`), -1 where a
shard carries none.

Train: one DataLoader for the whole run, so its workers start once, not at every epoch. Each
worker plays a role per epoch (DataLoader takes batches from workers in turn): role r makes the
epoch's batches r, r + W, ... from shards resampled and shuffled with seeds from (seed, epoch,
rank, role). Every rank has an endless stream and runs exactly the same number of batches per
epoch; uneven shards never leave one rank short (that hangs DDP: on CPU even
`join_uneven_inputs` does not save it). Because the stream is a pure function of those seeds,
a resumed run starts at the exact batch it stopped at. `accelerator.prepare` never sees these
loaders: it would shard them a second time.

Val: every rank reads every val shard and keeps samples rank, rank + W, ...: disjoint parts
however few val shards there are (webdataset's own node split would leave ranks empty).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from artscale.core.checks import field as checked
from artscale.core.checks import printable
from artscale.core.errors import UserError
from artscale.core.seeds import stable_seed
from artscale.data.images import decode_bytes
from artscale.data.manifest import read_manifest, shard_file

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
    classes: list[str] = field(default_factory=list)  # the manifest's, in label order; [] for a URL pattern


# `pipe:CMD` makes webdataset run CMD in a shell. A config file passed between users must not run
# commands by itself: only the user's own environment allows it (webdataset's WDS_SECURE refuses local
# files too, so artscale keeps its own gate).
ALLOW_PIPE_ENV = "ARTSCALE_ALLOW_PIPE"


def check_pipe(data: str, urls: list[str]) -> None:
    """Refuse a `pipe:` URL unless ARTSCALE_ALLOW_PIPE=1 is set in the environment."""
    piped = [u for u in urls if u.startswith("pipe:")]
    if piped and os.environ.get(ALLOW_PIPE_ENV) != "1":
        raise UserError(
            f"data={printable(data)[:120]}: a pipe: spec runs a shell command ({printable(piped[0])[:80]}); "
            f"artscale runs it only when you set {ALLOW_PIPE_ENV}=1 in the environment"
        )


def data_spec(data: str, image_size: int) -> DataSpec:
    """Check `data` (a shards dir with manifest.json, or a webdataset URL pattern) before training starts."""
    root = Path(data).expanduser()
    if root.is_dir():
        manifest = read_manifest(root)
        size = checked(manifest, "image_size", int, root / "manifest.json", low=1)
        if size != image_size:
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
            if not shard_file(root, s).is_file():
                raise UserError(
                    f"data={data}: shard {s['name']} listed in manifest.json is missing (run artscale verify {data})"
                )
        count = {split: sum(s["count"] for s in shards[split]) for split in shards}
        return DataSpec(
            [str(shard_file(root, s)) for s in shards["train"]],
            [str(shard_file(root, s)) for s in shards["val"]],
            count["train"],
            count["val"],
            image_size,
            list(manifest["classes"]),
        )
    if "{" not in data and "::" not in data and "://" not in data and not data.startswith("pipe:"):
        raise UserError(f"data={data}: not a shards directory (make one with: artscale pack SRC {data})")
    urls = wds.shardlists.expand_urls(data)
    check_pipe(data, urls)
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


def _every_nth(src: Iterator, rank: int, world: int) -> Iterator:
    return itertools.islice(src, rank, None, world)


def decode_sample(sample: dict, size: int | None = None) -> tuple[np.ndarray, int, str]:
    """A shard sample as (uint8 HWC RGB image, class index or -1 where the shard carries none, key).
    Raises where the sample cannot be used (no image, bytes that do not decode, not size x size):
    readers count that with a SkipCounter and go on (`decoded`)."""
    key = sample.get("__key__", "?")
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f"sample {key} in {sample.get('__url__')} has no image")
    im = decode_bytes(data)
    if size is not None and im.size != (size, size):
        raise ValueError(
            f"sample {key} in {sample.get('__url__')} is {im.size[0]}x{im.size[1]}, expected {size}x{size}"
        )
    return np.array(im, dtype=np.uint8), int(sample["cls"]) if "cls" in sample else -1, key


def decoded(samples: Iterable[dict], size: int | None, counter: SkipCounter) -> Iterator[tuple[np.ndarray, int, str]]:
    """`decode_sample` of each sample; one that cannot be used (a truncated image, a wrong size) is counted, skipped."""
    for sample in samples:
        try:
            yield decode_sample(sample, size)
        except Exception as e:
            counter(e)


def shard_images(
    urls: list[str], counter: SkipCounter, *, size: int | None = None, rank: int = 0, world: int = 1
) -> Iterator[tuple[np.ndarray, int]]:
    """Every usable sample of these shards, in order, as (uint8 HWC image, class index); what cannot be
    read goes to `counter`. With `world` > 1, only samples rank, rank + world, ... (the others are not decoded)."""
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=counter))
    return ((image, label) for image, label, _ in decoded(_every_nth(samples, rank, world), size, counter))


def _tensors(samples: Iterator, size: int | None, flip_seed: int | None, counter: SkipCounter) -> Iterator:
    """Usable samples as (uint8 CHW tensor, class index, key), mirrored where the coin of (flip_seed, key)
    says: position-free, so resume-exact."""
    for image, label, key in decoded(samples, size, counter):
        x = torch.from_numpy(image).permute(2, 0, 1)
        if flip_seed is not None and stable_seed(flip_seed, key) & 1:
            x = x.flip(-1)
        yield x.contiguous(), label, key


def _batched(src: Iterator, batch_size: int, counter: SkipCounter, partial: bool = False) -> Iterator:
    """(images, labels, keys, skipped): skipped is what this worker skipped since its last batch."""
    src = iter(src)
    while group := list(itertools.islice(src, batch_size)):
        if len(group) == batch_size or partial:
            images, labels, keys = zip(*group)
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(keys), counter.take()


class _TrainStream(IterableDataset):
    """This rank's endless train batches from global batch `start` on (see the module docstring)."""

    def __init__(
        self,
        spec: DataSpec,
        batch_size: int,
        epoch_batches: int,
        seed: int,
        rank: int,
        start: int,
        hflip: bool,
        bufsize: int,
    ) -> None:
        self.spec, self.batch_size, self.epoch_batches = spec, batch_size, epoch_batches
        self.seed, self.rank, self.start, self.hflip, self.bufsize = seed, rank, start, hflip, bufsize

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        counter = SkipCounter()
        epoch, done = divmod(self.start, self.epoch_batches)
        first = -done  # this loader's index of the epoch's batch 0; DataLoader gives index i to worker i % workers
        while True:
            role = (worker - first) % workers
            skip = max(0, -(-(done - role) // workers))  # what this role made of the epoch's first `done` batches
            mine = len(range(role, self.epoch_batches, workers)) - skip
            yield from itertools.islice(self._epoch(epoch, role, skip, counter), mine)
            epoch, done, first = epoch + 1, 0, first + self.epoch_batches

    def _epoch(self, epoch: int, role: int, skip: int, counter: SkipCounter) -> Iterator:
        rng = random.Random(stable_seed(self.seed, epoch, self.rank, role))
        urls = self.spec.train_urls
        shards = ({"url": urls[rng.randrange(len(urls))]} for _ in itertools.count())
        # webdataset's shuffle buffer (yields from 100 samples on, grows to bufsize), drawing from this role's rng
        # (its default seeds from the clock): on this endless stream a pure function of the seeds, so resume is exact.
        samples = wds.shuffle(self.bufsize, rng=rng)(wds.tariterators.tarfile_samples(shards, handler=counter))
        samples = itertools.islice(samples, skip * self.batch_size, None)
        flip_seed = stable_seed(self.seed, epoch) if self.hflip else None
        return _batched(_tensors(samples, self.spec.image_size, flip_seed, counter), self.batch_size, counter)


def train_loader(
    spec: DataSpec,
    *,
    batch_size: int,
    epoch_batches: int,
    seed: int,
    rank: int,
    num_workers: int = 0,
    start: int = 0,
    hflip: bool = False,
    shuffle_buffer: int = 1000,
) -> DataLoader:
    """Endless batches of (images uint8, labels, keys, skipped) for this rank, from batch `start`
    (batch `start % epoch_batches` of epoch `start // epoch_batches`) on."""
    stream = _TrainStream(spec, batch_size, epoch_batches, seed, rank, start, hflip, shuffle_buffer)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())


def val_loader(spec: DataSpec, *, batch_size: int, rank: int, world: int, num_workers: int = 0) -> wds.WebLoader | None:
    """This rank's disjoint part of the val split, once, as (images, labels, keys, skipped); None without val shards."""
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
        wds.pipelinefilter(_tensors)(spec.image_size, None, counter),
        wds.pipelinefilter(_batched)(batch_size, counter, partial=True),
    )
    # Fewer shards than workers would leave workers empty (webdataset's empty_check raises): cap them.
    return wds.WebLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(spec.val_urls)))

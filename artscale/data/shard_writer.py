"""This module writes one split's shards so that a kill at any moment loses nothing finished.

No half-written file is left under a final name; the journal says which shards are finished and verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from artscale.core.atomic import append_text, create_fresh, write_atomic
from artscale.data.collection import Entry

SHARD_MTIME = 946_684_800  # 2000-01-01: tar members get a fixed time, so reruns are byte-identical


def _tar_bytes(sample: dict) -> int:
    """What a sample adds to a tar: a 512-byte header per field plus its data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")


def _tar_file_bytes(members: int) -> int:
    """A streamed tar's file size: the members, two zero blocks, padded to 20 x 512 bytes."""
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f) -> str:
    """The sha256 of what is left to read in the open binary file `f`."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


class Journal:
    """Append-only record of finished shards (JSON lines, fsynced); a torn last line is ignored."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
        return records

    def start(self, header: dict) -> None:
        write_atomic(self.path, json.dumps(header) + "\n", sync_dir=True)

    def append(self, record: dict) -> None:
        append_text(self.path, json.dumps(record) + "\n")


class SplitWriter:
    """One split's shards through webdataset's ShardWriter: each tar is written as NAME.partial,
    then hashed, renamed and journaled; skips are booked with the shard of the next sample."""

    def __init__(self, out: Path, split: str, journal: Journal, start_shard: int, total: int, settings: dict):
        self.split, self.journal, self.total = split, journal, total
        self.ext = settings["image_format"]
        max_count, max_bytes = settings["shard_max_count"], settings["shard_max_bytes"]
        self.pattern = str(out).replace("%", "%%") + f"/{split}-%06d.tar"
        self.start_shard, self.max_count, self.max_bytes = start_shard, max_count, max_bytes
        self.writer = None
        self.file = None
        self.tar_bytes = 0  # members written to the open shard, as tar bytes
        self.pending_skips: list[dict] = []
        self.records: list[dict] = []
        self._new_record()

    def _new_record(self) -> None:
        self.current: dict[str, Any] = {"per_class": {}, "skipped": [], "end": 0}

    def _open(self, fname: str):
        self.file = create_fresh(fname + ".partial")
        return self.file

    def _finish(self, fname: str) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        partial, final = Path(fname + ".partial"), Path(fname)
        record = {
            "kind": "shard",
            "name": final.name,
            "split": self.split,
            "count": sum(self.current["per_class"].values()),
            "bytes": partial.stat().st_size,
            "sha256": sha256_file(partial),
            **self.current,
        }
        partial.replace(final)
        self.journal.append(record)
        self.records.append(record)
        self._new_record()

    def add(self, index: int, entry: Entry, data: bytes | None, info: Any) -> None:
        if data is None:
            self.pending_skips.append({"path": entry.rel, "reason": info, "cls": entry.cls})
            return
        if self.writer is None:
            import webdataset as wds

            self.writer = wds.ShardWriter(
                self.pattern,
                maxcount=self.max_count,
                maxsize=float("inf"),
                post=self._finish,
                start_shard=self.start_shard,
                verbose=0,
                opener=self._open,
                mtime=SHARD_MTIME,
                encoder=False,
            )
        meta = {"path": entry.rel, "class": entry.cls_name, "original_size": list(info)}
        sample = {
            "__key__": entry.key,
            self.ext: data,
            "cls": str(entry.cls).encode("ascii"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
        grows = _tar_bytes(sample)
        if self.max_bytes and self.writer.count and _tar_file_bytes(self.tar_bytes + grows) > self.max_bytes:
            self.writer.next_stream()  # by file size, headers included (ShardWriter counts payload only)
        if self.writer.count == 0 or self.writer.count >= self.max_count:
            self.tar_bytes = 0
        self.tar_bytes += grows
        self.writer.write(sample)  # may finish the previous shard first (post=_finish)
        per_class = self.current["per_class"]
        per_class[str(entry.cls)] = per_class.get(str(entry.cls), 0) + 1
        self.current["skipped"] += self.pending_skips
        self.current["end"] = index + 1
        self.pending_skips = []

    def abandon(self) -> None:
        """After a failed write (a full disk): drop the open shard, which keeps its .partial name.
        tarfile would otherwise flush its buffer into the failing file again when collected."""
        tar = getattr(getattr(self.writer, "tarstream", None), "tarstream", None)
        if tar is not None:
            tar.closed = True
            tar.fileobj.closed = True
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()

    def close(self) -> list[dict]:
        """Finish the last shard; returns skips not booked with any shard (a split without samples)."""
        if self.writer is None:
            return self.pending_skips
        self.current["skipped"] += self.pending_skips
        self.current["end"] = self.total
        self.pending_skips = []
        self.writer.close()
        return []

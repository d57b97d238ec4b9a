"""Pack an image folder (one subfolder per class) into WebDataset shards plus manifest.json.

A cluster streams a few hundred large tars far faster than millions of small files. The output
depends only on SRC and the settings, never on the worker count or the clock, so a rerun gives
the same bytes. A killed pack continues where it stopped: every finished shard is recorded in a
journal with its sha256, and a shard carries its final name only once it is complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import sys
import tarfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from artscale import __version__
from artscale.core.atomic import TMP_SUFFIX, write_atomic
from artscale.core.checks import BadFile, printable
from artscale.core.errors import UserError
from artscale.core.progress import Progress
from artscale.core.system import multiple_of_8, usable_cores
from artscale.data.collection import Collection, Entry, scan_collection
from artscale.data.images import DEFAULT_MAX_PIXELS, SkipImage, encode_image, load_image
from artscale.data.manifest import MANIFEST, SPLITS, check_shard, read_manifest, split_shards
from artscale.data.shard_writer import Journal, SplitWriter, sha256_file, sha256_stream

JOURNAL = ".pack-journal.jsonl"
MIN_TRAIN_SHARDS = 8  # a loader worker reads one shard at a time into its shuffle buffer: few shards mix poorly
_CHUNK = 8  # files per task sent to a worker
_SETTINGS: dict[str, Any] = {}  # the decode settings, set once per worker process


def _decode(path: str) -> tuple[bytes | None, Any]:
    """Worker: (encoded image, original size), or (None, the skip reason)."""
    s = _SETTINGS
    try:
        im, original = load_image(path, (s["size"], s["size"]), s["resize"], s["max_pixels"], min_side=s["min_size"])
    except SkipImage as e:
        return None, str(e)
    return encode_image(im, s["image_format"], s["quality"]), original


def _init_worker(settings: dict[str, Any]) -> None:
    _SETTINGS.clear()
    _SETTINGS.update(settings)


@dataclass
class PackSettings:
    """What a pack's bytes depend on besides SRC, checked once here. The journal and manifest.json record
    them (`asdict`), and a pack continues only into an OUT packed with equal ones."""

    size: int = 128
    val_fraction: float = 0.05
    classes: list[str] = field(default_factory=list)  # class folders to pack (all: empty); kept sorted
    resize: str = "stretch"
    image_format: str = "jpg"
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_size: int = 0
    follow_symlinks: bool = False
    shard_max_count: int = 1000
    shard_max_bytes: int = 0

    def __post_init__(self) -> None:
        if self.image_format not in ("jpg", "png"):
            raise UserError(f"--format {self.image_format}: choose jpg or png")
        if self.resize not in ("stretch", "center-crop"):
            raise UserError(f"--resize {self.resize}: choose stretch or center-crop")
        if not multiple_of_8(self.size):
            raise UserError(f"--size {self.size}: must be a positive multiple of 8")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.shard_max_count < 1 or self.shard_max_bytes < 0:
            raise UserError("--shard-max-count must be >= 1 and --shard-max-bytes >= 0")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality}: must be in 1..100")
        self.classes = sorted(self.classes)


def _our_files(out: Path) -> list[Path]:
    names = (MANIFEST, MANIFEST + ".tmp", JOURNAL, JOURNAL + ".tmp")
    return [
        p
        for p in out.iterdir()
        if p.name in names
        or p.name.endswith((".partial", TMP_SUFFIX))
        or (p.suffix == ".tar" and p.name.split("-")[0] in SPLITS)
    ]


def _clean(out: Path, keep: set[str] = frozenset()) -> None:
    for p in _our_files(out):
        if p.name not in keep:
            p.unlink()


def _refuse(out: Path, old: dict, new: dict) -> None:
    if old.get("source") != new["source"]:
        why = f"shards of {old.get('source')}"
    else:
        diff = [
            f"{k} {old.get('settings', {}).get(k)!r} (now {v!r})"
            for k, v in new["settings"].items()
            if old.get("settings", {}).get(k) != v
        ]
        why = "shards packed with " + ", ".join(diff)
    raise UserError(f"{out} holds {printable(why)}; use --force to replace them, or another OUT")


def _trusted(r: Any, path: Path, before: int, classes: int) -> bool:
    """Whether a journal record is a shard record pack wrote: the next shard of its split by name, its
    counts per class index, its skips and where it ended. Others (a hand-edited or foreign journal)
    are dropped like a shard whose bytes changed."""
    try:
        check_shard(r, path, "record")
        per_class, skipped, end = r.get("per_class"), r.get("skipped"), r.get("end")
        return (
            r["name"] == f"{r['split']}-{before:06d}.tar"
            and isinstance(per_class, dict)
            and all(k.isdigit() and int(k) < classes and type(n) is int and n >= 0 for k, n in per_class.items())
            and isinstance(skipped, list)
            and all(
                isinstance(x, dict)
                and isinstance(x.get("path"), str)
                and isinstance(x.get("reason"), str)
                and type(x.get("cls")) is int
                and 0 <= x["cls"] < classes
                for x in skipped
            )
            and type(end) is int
            and end >= 0
        )
    except BadFile:
        return False


def _resume(out: Path, identity: dict, fingerprint: str, force: bool, classes: int) -> tuple[dict | None, list[dict]]:
    """Decide what OUT already holds: (a finished manifest to keep, or None; journal records to keep)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file; pick a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create OUT {out}: {e.strerror or e}") from None
    if force:
        _clean(out)
        return None, []
    journal = Journal(out / JOURNAL)
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        if {"source": old.get("source"), "settings": old.get("settings")} != identity:
            _refuse(out, old, identity)
        intact = all(
            not (out / s["name"]).is_symlink()
            and (out / s["name"]).is_file()
            and (out / s["name"]).stat().st_size == s["bytes"]
            for s in old["shards"]
        )
        if old.get("fingerprint") == fingerprint and intact:
            if journal.path.exists():
                journal.path.unlink()
            return old, []
        print(
            f"artscale: {'SRC changed' if intact else 'shards are missing'} since {out} was packed: packing again",
            file=sys.stderr,
        )
        _clean(out)
        return None, []
    records = journal.read()
    if not records:
        foreign = [p.name for p in out.iterdir() if p not in _our_files(out)]
        if foreign:
            raise UserError(
                f"{out} is not empty and holds no artscale shards ({foreign[0]}, ...); pick an empty or new OUT"
            )
        _clean(out)
        return None, []
    header = records[0]
    old = header.get("identity") if isinstance(header, dict) else None
    if not isinstance(old, dict) or not isinstance(old.get("settings", {}), dict):
        print(f"artscale: {journal.path} is not a journal pack wrote: starting over", file=sys.stderr)
        _clean(out)
        return None, []
    if header.get("identity") != identity:
        _refuse(out, header.get("identity", {}), identity)
    if header.get("fingerprint") != fingerprint:
        print(f"artscale: SRC changed since the interrupted pack into {out}: starting over", file=sys.stderr)
        _clean(out)
        return None, []
    kept, broken = [], set()
    for r in records[1:]:
        split = r.get("split") if isinstance(r, dict) else None
        if not _trusted(r, journal.path, sum(k["split"] == split for k in kept), classes):
            broken.update([split] if split in SPLITS else SPLITS)
            continue
        path = out / r["name"]
        if (
            r["split"] in broken
            or path.is_symlink()
            or not path.is_file()
            or path.stat().st_size != r["bytes"]
            or sha256_file(path) != r["sha256"]
        ):
            broken.add(r["split"])
            continue
        kept.append(r)
    _clean(out, keep={r["name"] for r in kept} | {JOURNAL})
    journal.start(header)  # rewrite without the records that were dropped
    for r in kept:
        journal.append(r)
    return None, kept


def pack(src: Path, out: Path, *, workers: int = 0, force: bool = False, **settings: Any) -> dict:
    """Pack SRC's class folders into OUT's shards and manifest.json; returns the manifest.
    `settings`: PackSettings' fields (size, val_fraction, classes, ...), its defaults where left out."""
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    chosen = PackSettings(**settings)
    settings = asdict(chosen)
    coll = scan_collection(src, chosen.classes, chosen.follow_symlinks, chosen.val_fraction)
    if src.resolve() == out.resolve() or out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"OUT {out} lies inside SRC {src}: pick an OUT outside it")
    identity = {"source": str(src.resolve()), "settings": settings}
    done, kept = _resume(out, identity, coll.fingerprint, force, len(coll.classes))
    if done is not None:
        print(f"{out} already holds this collection's shards: nothing to do")
        return done
    journal = Journal(out / JOURNAL)
    if not kept:
        journal.start({"kind": "header", "identity": identity, "fingerprint": coll.fingerprint})
    try:
        records = _run(coll, out, settings, kept, journal, workers)
        manifest = _manifest(coll, identity, records)
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=True) + "\n", sync_dir=True)
    except OSError as e:  # a full disk, a quota, a read-only mount: finished shards stay in the journal
        where = f" {e.filename}" if e.filename else f" in {out}"
        raise UserError(
            f"cannot write{where}: {e.strerror or e}; finished shards are kept, run the same command again to continue"
        ) from None
    journal.path.unlink()
    _summary(manifest, src, out, time.perf_counter() - started)
    return manifest


def _run(coll: Collection, out: Path, settings: dict, kept: list[dict], journal: Journal, workers: int) -> list[dict]:
    """Decode what the kept shards do not cover, in a process pool, and write it in order."""
    todo: list[tuple[str, int, Entry]] = []
    writers: dict[str, SplitWriter] = {}
    for split in SPLITS:
        mine = [r for r in kept if r["split"] == split]
        begin = mine[-1]["end"] if mine else 0
        files = coll.splits[split]
        writers[split] = SplitWriter(out, split, journal, len(mine), len(files), settings)
        writers[split].records = list(mine)
        todo += [(split, i, files[i]) for i in range(begin, len(files))]
    if kept:
        print(
            f"artscale: resuming: {len(kept)} finished shards verified and kept, {len(todo)} files to go",
            file=sys.stderr,
        )
    if workers <= 0:
        workers = usable_cores()
    decode = {k: settings[k] for k in ("size", "resize", "max_pixels", "min_size", "image_format", "quality")}
    paths = [str(coll.root / e.rel) for _, _, e in todo]
    records, loose = [], []
    try:
        with Progress(len(todo), "pack") as bar:  # a bar on a terminal, plain lines in a batch job
            for (split, index, entry), (data, info) in zip(todo, _map_decode(paths, decode, workers)):
                writers[split].add(index, entry, data, info)
                bar.update(1)
        for split in SPLITS:
            loose += writers[split].close()
            records += writers[split].records
    except OSError:
        for writer in writers.values():
            writer.abandon()
        raise
    return records + [{"kind": "loose", "skipped": loose}]


def _decode_many(paths: list[str]) -> list[tuple[bytes | None, Any]]:
    return [_decode(p) for p in paths]


def _map_decode(paths: list[str], decode: dict, workers: int) -> Iterator[tuple[bytes | None, Any]]:
    """Decoded results in input order: in worker processes, or here for 1 worker.

    ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed for memory, or
    unable to start because __main__ cannot be re-imported, as under `python -`) breaks the pool
    with an error instead of being replaced forever; the rest is then decoded here.
    """
    done = 0
    if workers > 1 and len(paths) > 1:
        # Never plain fork: the parent may run threads (tqdm, torch). A fork server with this
        # module preloaded starts workers sooner than spawn, which imports everything again.
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
        else:
            ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            min(workers, len(paths)), mp_context=ctx, initializer=_init_worker, initargs=(decode,)
        )
        pending: deque = deque()
        try:
            for start in range(0, len(paths), _CHUNK):
                pending.append(pool.submit(_decode_many, paths[start : start + _CHUNK]))
                while len(pending) > 4 * workers or (start + _CHUNK >= len(paths) and pending):
                    for result in pending.popleft().result():
                        done += 1
                        yield result
        except BrokenProcessPool as e:
            print(f"artscale: warning: decode workers died ({e}); going on in this process", file=sys.stderr)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    _init_worker(decode)
    yield from map(_decode, paths[done:])


def _manifest(coll: Collection, identity: dict, records: list[dict]) -> dict:
    shards = [{k: r[k] for k in ("name", "split", "count", "bytes", "sha256")} for r in records if r["kind"] == "shard"]
    skipped = list(coll.skipped) + [s for r in records for s in r["skipped"]]
    per_class = {name: {"seen": 0, "packed": 0, "skipped": 0, "ignored": 0} for name in coll.classes}
    for name, n in coll.seen.items():
        per_class[name]["seen"] = n
    for name, n in coll.ignored.items():
        per_class[name]["ignored"] = n
    for s in skipped:
        per_class[coll.classes[s["cls"]]]["skipped"] += 1
    for r in records:
        for cls, n in r.get("per_class", {}).items():
            per_class[coll.classes[int(cls)]]["packed"] += n
    splits = {
        split: {
            "count": sum(s["count"] for s in shards if s["split"] == split),
            "shards": sum(1 for s in shards if s["split"] == split),
        }
        for split in SPLITS
    }
    settings = identity["settings"]
    return {
        "artscale_version": __version__,
        "source": identity["source"],
        "classes": coll.classes,
        "image_size": settings["size"],
        "image_format": settings["image_format"],
        "resize": settings["resize"],
        "settings": settings,
        "shards": shards,
        "splits": splits,
        "per_class": per_class,
        "skipped": sorted(({"path": s["path"], "reason": s["reason"]} for s in skipped), key=lambda s: s["path"]),
        "ignored": sum(coll.ignored.values()) + coll.unclassified,
        "unclassified": coll.unclassified,
        "fingerprint": coll.fingerprint,
    }


def _summary(m: dict, src: Path, out: Path, seconds: float) -> None:
    packed = sum(c["packed"] for c in m["per_class"].values())
    seen = sum(c["seen"] for c in m["per_class"].values())
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(
        f"packed {packed} of {seen} files from {src} into {out}: train {tr['count']} in {tr['shards']} shards, "
        f"val {va['count']} in {va['shards']} shards; skipped {len(m['skipped'])}, ignored {m['ignored']}; "
        f"{seconds:.1f} s ({packed / max(seconds, 1e-9):.0f} img/s)"
    )
    if tr["shards"] < MIN_TRAIN_SHARDS:
        print(
            f"artscale: warning: only {tr['shards']} train shards; each loader worker reads one shard at a time into "
            f"its shuffle buffer, so a batch mixes few shards: lower --shard-max-count for {MIN_TRAIN_SHARDS} or more",
            file=sys.stderr,
        )


def _count_samples(f, name: str, ext: str) -> tuple[int, list[str]]:
    """Samples in an open tar, read with plain tarfile, and what is wrong with any of them."""
    fields: dict[str, set[str]] = {}
    with tarfile.open(fileobj=f) as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            fields.setdefault(key, set()).add(suffix)
    want = {ext, "cls", "json"}
    bad = [
        f"{name}: sample {printable(k)} has {printable(', '.join(sorted(v)))}, expected {', '.join(sorted(want))}"
        for k, v in fields.items()
        if v != want
    ]
    return len(fields), bad


def _verify_shard(out: Path, s: dict, image_format: str) -> list[str]:
    """What is wrong with one listed shard. It is opened without following a symlink (a link may
    lead outside SHARDS), and hashed and counted from that one open file."""
    name = s["name"]
    try:
        fd = os.open(out / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return [f"{name}: missing"]
    except OSError as e:
        if (out / name).is_symlink():
            return [f"{name}: a symlink; shards are read only as files inside {out} (copy the shard there)"]
        return [f"{name}: unreadable ({e.strerror or e})"]
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return [f"{name}: not a regular file"]
        problems = []
        if st.st_size != s["bytes"]:
            problems.append(f"{name}: {st.st_size} bytes, manifest says {s['bytes']}")
        if sha256_stream(f) != s["sha256"]:
            return [*problems, f"{name}: sha256 differs from the manifest (the file changed or is corrupt)"]
        f.seek(0)
        try:
            count, bad = _count_samples(f, name, image_format)
        except (tarfile.TarError, OSError) as e:
            return [*problems, f"{name}: not a readable tar ({printable(str(e))})"]
    problems += bad
    if count != s["count"]:
        problems.append(f"{name}: {count} samples, manifest says {s['count']}")
    return problems


def verify(out: Path) -> list[str]:
    """Re-hash and re-count every shard against manifest.json; the problems found (empty: all good)."""
    out = Path(out)
    m = read_manifest(out)
    problems = []
    listed = {s["name"] for s in m["shards"]}
    bar = Progress(len(m["shards"]), "verify", unit="shard")
    for s in m["shards"]:
        problems += _verify_shard(out, s, m["image_format"])
        bar.update()
    bar.close()
    for split in SPLITS:
        shards = split_shards(m, split)
        if m["splits"][split]["count"] != sum(s["count"] for s in shards):
            problems.append(f"manifest: {split} count {m['splits'][split]['count']} is not the sum over its shards")
    extra = sorted(p.name for p in out.glob("*.tar") if p.name not in listed)
    problems += [f"{printable(name)}: a shard that the manifest does not list" for name in extra]
    return problems


def describe_shards(out: Path) -> str:
    """What a shards dir holds, for `artscale info`."""
    m = read_manifest(Path(out))
    tr, va = m["splits"]["train"], m["splits"]["val"]
    total = sum(s["bytes"] for s in m["shards"])
    lines = [
        f"shards {out} (artscale {printable(m.get('artscale_version', '?'))}, from {printable(m.get('source', '?'))})",
        f"  images: {m['image_size']} px {m['image_format']} ({printable(m.get('resize', '?'))}), {total / 1e6:.1f} MB",
        f"  classes ({len(m['classes'])}): {printable(', '.join(m['classes']))}",
        f"  train: {tr['count']} samples in {tr['shards']} shards; val: {va['count']} samples in {va['shards']} shards",
        f"  skipped {len(m.get('skipped', []))}, ignored {m.get('ignored', 0)}",
    ]
    for name, c in m.get("per_class", {}).items():
        lines.append(
            f"    {name}: seen {c['seen']}, packed {c['packed']}, skipped {c['skipped']}, ignored {c['ignored']}"
        )
    reasons: dict[str, int] = {}
    for s in m.get("skipped", []):
        reason = s["reason"].split(":")[0].split(" (")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    lines += [f"  skipped, {printable(reason)}: {n}" for reason, n in sorted(reasons.items())]
    return "\n".join(lines)

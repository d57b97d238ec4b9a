"""The input tree of `artscale generate`: every file's fate, its output name, its shard.

A tree is walked by collection.TreeWalker, the same rules as `artscale pack` (hidden folders and
junk ignored, links that lead outside IN_DIR skipped unless --follow-symlinks). An array of K
tasks over a million files on a shared filesystem would walk it K + 1 times; `--list-only`
walks it once and writes OUT_DIR/listing.jsonl, which the tasks and the merge read instead.
The listing also keeps each folder's modification time, so the merge finds files added since
with one stat() per folder instead of another walk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from artscale.core.atomic import write_atomic
from artscale.core.errors import UserError
from artscale.data.collection import TreeWalker
from artscale.data.images import IMAGE_EXTENSIONS

LISTING = "listing.jsonl"
FOLLOW_HINT = "follows"  # "--follow-symlinks follows it"


@dataclass(frozen=True)
class InputFile:
    """One file of IN_DIR: its relative path, its output's relative path, or why it has none."""

    rel: str
    out: str = ""
    ignored: bool = False
    reason: str = ""  # set when the file is skipped before decoding


@dataclass
class Listing:
    """What OUT_DIR/listing.jsonl holds: the tree as it was, and how it was listed."""

    in_dir: str  # resolved
    ext: str
    follow_symlinks: bool
    entries: list[InputFile]
    folders: dict[str, int] = field(default_factory=dict)  # folder -> st_mtime_ns when it was listed
    created: str = ""


def output_names(names: list[str], ext: str, folders: set[str] = frozenset()) -> dict[str, str]:
    """File names of one folder -> output names: `x.jpg` -> `x.png`, but when two inputs (or a
    folder) would share that name, each keeps its whole name: `x.jpg.png`, `x.png.png`.
    Names that still clash with a folder map to ""."""
    whole: set[str] = set()
    while True:
        out = {n: (n if n in whole else os.path.splitext(n)[0]) + ext for n in names}
        users: dict[str, list[str]] = {}
        for name, target in out.items():
            users.setdefault(target, []).append(name)
        clash = {n for target, group in users.items() if len(group) > 1 or target in folders for n in group}
        if not clash - whole:
            return {n: ("" if out[n] in folders else out[n]) for n in names}
        whole |= clash


def _walk(in_dir: Path, follow_symlinks: bool) -> TreeWalker:
    walker = TreeWalker(os.path.realpath(in_dir), follow_symlinks, "IN_DIR", FOLLOW_HINT, stat=False)
    walker.walk(str(in_dir))
    return walker


def _entries(walker: TreeWalker, ext: str) -> list[InputFile]:
    """The walker's files as entries, output names decided per folder over all its files.
    Plain string operations: a pathlib object per file costs more than the walk itself on a large tree."""
    split = [(rel, fate, *rel.rpartition("/")[::2]) for rel, fate, _, _ in walker.files]  # rel, fate, folder, name
    candidates: dict[str, list[str]] = {}
    for _, fate, folder, name in split:
        if not fate and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            candidates.setdefault(folder, []).append(name)
    names = {
        folder: output_names(files, ext, walker.folders.get(folder, set())) for folder, files in candidates.items()
    }
    entries = []
    for rel, fate, folder, name in split:
        suffix = os.path.splitext(name)[1]
        if fate == "ignored":
            entries.append(InputFile(rel, ignored=True))
        elif fate:
            entries.append(InputFile(rel, reason=fate))
        elif suffix.lower() not in IMAGE_EXTENSIONS:
            entries.append(InputFile(rel, reason=f"not an image file name ({suffix or 'no extension'})"))
        elif out := names[folder][name]:
            entries.append(InputFile(rel, f"{folder}/{out}" if folder else out))
        else:
            entries.append(InputFile(rel, reason="its output name is a folder's name"))
    return entries


def list_inputs(in_dir: Path, ext: str, follow_symlinks: bool = False) -> list[InputFile]:
    """Every file under in_dir in a stable order (sorted walk), named over the whole listing."""
    return _entries(_walk(Path(in_dir), follow_symlinks), ext)


def shard_of(rel: str, num_shards: int) -> int:
    """A stable shard for a relative path: the same on every machine, unchanged when files are added."""
    return int.from_bytes(hashlib.sha1(os.fsencode(rel)).digest()[:8], "big") % num_shards


def _fate(e: InputFile) -> str:
    return "ignored" if e.ignored else e.reason


def write_listing(in_dir: Path, out_dir: Path, ext: str, follow_symlinks: bool) -> Listing:
    """Walk IN_DIR once and write OUT_DIR/listing.jsonl: a header line, then [rel, out, fate] per file."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    walker = _walk(in_dir, follow_symlinks)
    listing = Listing(
        str(in_dir.resolve()),
        ext,
        follow_symlinks,
        _entries(walker, ext),
        walker.mtimes,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    header = {
        "artscale_listing": 1,
        "in_dir": listing.in_dir,
        "ext": ext,
        "follow_symlinks": follow_symlinks,
        "files": len(listing.entries),
        "created": listing.created,
        "folders": listing.folders,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps([e.rel, e.out, _fate(e)]) for e in listing.entries]  # ASCII: JSON escapes the rest
    write_atomic(out_dir / LISTING, "\n".join([json.dumps(header), *rows]) + "\n")
    return listing


def load_listing(out_dir: Path) -> Listing | None:
    """OUT_DIR/listing.jsonl as it was written (None when there is none), whatever tree it lists;
    a UserError when it is not a whole, readable listing."""
    path = Path(out_dir) / LISTING
    if not path.is_file():
        return None
    again = f"run `artscale generate ... --list-only` again, or remove {path}"
    try:
        with open(path) as f:
            header = json.loads(f.readline())
            # one parse for all rows (a row never holds a raw newline: JSON escapes it), not one per row
            rows = json.loads("[" + f.read().rstrip("\n").replace("\n", ",") + "]")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable listing ({e}); {again}") from None
    if not isinstance(header, dict) or header.get("artscale_listing") != 1 or len(rows) != header.get("files"):
        raise UserError(f"{path} is not a whole artscale listing; {again}")
    entries = [
        InputFile(rel, ignored=True) if fate == "ignored" else InputFile(rel, out, reason=fate)
        for rel, out, fate in rows
    ]
    return Listing(
        str(header.get("in_dir", "")),
        str(header.get("ext", "")),
        bool(header.get("follow_symlinks", False)),
        entries,
        header.get("folders", {}),
        header.get("created", ""),
    )


def read_listing(out_dir: Path, in_dir: Path, ext: str, follow_symlinks: bool) -> Listing | None:
    """OUT_DIR/listing.jsonl when there is one (None when not); a UserError when it lists another
    tree, another output format or another symlink rule than this run's."""
    listing = load_listing(out_dir)
    if listing is None:
        return None
    wanted = {"in_dir": str(Path(in_dir).resolve()), "ext": ext, "follow_symlinks": follow_symlinks}
    differ = [f"{k} {getattr(listing, k)!r} (this run: {v!r})" for k, v in wanted.items() if getattr(listing, k) != v]
    if differ:
        path = Path(out_dir) / LISTING
        again = f"run `artscale generate ... --list-only` again, or remove {path}"
        raise UserError(f"{path} was made with {', '.join(differ)}; {again}")
    return listing


def files_after_listing(listing: Listing) -> list[str]:
    """Files in the tree now that the listing lacks. A folder that gained an entry has a newer
    modification time: only those are read again, so this is one stat() per listed folder."""
    root = Path(listing.in_dir)
    known = {e.rel for e in listing.entries} | set(listing.folders)
    late: list[str] = []
    for folder, mtime in listing.folders.items():
        path = root / folder if folder else root
        try:
            if os.stat(path).st_mtime_ns == mtime:
                continue
            names = sorted(os.listdir(path))
        except OSError:  # a folder removed since: its files show up as missing outputs
            continue
        for name in names:
            rel = f"{folder}/{name}" if folder else name
            if rel in known:
                continue
            if os.path.isdir(root / rel):
                late += [f"{rel}/{e.rel}" for e in list_inputs(root / rel, listing.ext, listing.follow_symlinks)]
            else:
                late.append(rel)
    return sorted(late)

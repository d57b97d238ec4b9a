"""List an ImageFolder-style collection: classes, every file's fate, the split, sample keys.

Only names and stat() are read here (no image bytes), so the listing is cheap to redo on every
run; `artscale pack` compares its fingerprint to tell a resumed pack from a changed collection.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from artscale.core.checks import BadFile, printable, safe_component
from artscale.core.errors import UserError
from artscale.data.images import is_ignored

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Entry:
    """A file to decode: its POSIX path relative to SRC, class, and sample key."""

    rel: str
    cls: int
    cls_name: str

    @property
    def key(self) -> str:
        return sample_key(self.rel)


@dataclass
class Collection:
    root: Path
    classes: list[str]
    splits: dict[str, list[Entry]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # skipped from the listing alone: {path, reason, cls}
    seen: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    unclassified: int = 0  # files directly in SRC, outside any class folder (ignored)
    fingerprint: str = ""


def _digest(salt: str, rel: str) -> bytes:
    return hashlib.sha1(salt.encode() + os.fsencode(rel)).digest()


def sample_key(rel: str) -> str:
    """A stable key from the relative path with no dots (webdataset splits the extension at the
    first dot), short enough for a ustar name, and unique through a hash of the whole path."""
    slug = _UNSAFE.sub("_", rel)[-48:].strip("_") or "x"
    return f"{slug}-{_digest('key', rel).hex()[:16]}"


def is_val(rel: str, val_fraction: float) -> bool:
    """The split from a hash of the path alone: adding files never moves the others."""
    return int.from_bytes(_digest("split", rel)[:8], "big") / 2**64 < val_fraction


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _class_names(src: Path, wanted: list[str]) -> list[str]:
    if not src.exists():
        raise UserError(f"SRC {src} not found")
    if not src.is_dir():
        raise UserError(f"SRC {src} is not a folder (expected one subfolder per class)")
    children = [p for p in src.iterdir() if not p.name.startswith(".")]
    if not children:
        raise UserError(f"SRC {src} is empty: put images in SRC/<class>/")
    names = sorted(p.name for p in children if p.is_dir())
    if not names:
        raise UserError(f"SRC {src} has no class folders: put images in SRC/<class>/, one folder per class")
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise UserError(f"--classes {','.join(unknown)}: no such folder in SRC (it has: {printable(', '.join(names))})")
    chosen = sorted(set(wanted)) if wanted else names
    for name in chosen:  # a class name becomes a folder of sample's output and is printed: one safe name
        try:
            safe_component(name, src, "class folder")
        except BadFile as e:
            raise UserError(f"{e}: rename it, or pack the other classes with --classes") from None
    return chosen


class TreeWalker:
    """Walks a folder in sorted order, deciding each file's fate from names and links alone.

    The one definition of "inside the tree" for pack (SRC) and generate (IN_DIR): a symlink whose
    target lies outside the root, or a symlink to a folder, is skipped with its reason unless
    `follow` (--follow-symlinks); files in hidden folders, hidden files and known junk are
    "ignored"; a folder reached twice is a loop. `files` holds (rel, fate, size, mtime_ns), fate
    "" (a file to decode), "ignored" or a skip reason; size and time only with `stat`.
    `folders` maps each folder walked to the names of its subfolders (links to folders included).
    """

    def __init__(self, root_real: str, follow: bool, root_name: str = "SRC", verb: str = "packs", stat: bool = True):
        self.root_real, self.follow, self.stat = root_real, follow, stat
        self.root_name, self.follow_hint = root_name, f"--follow-symlinks {verb} it"  # each stage names itself
        self.files: list[tuple[str, str, int, int]] = []
        self.folders: dict[str, set[str]] = {}
        self.mtimes: dict[str, int] = {}  # folder -> st_mtime_ns, taken before reading it
        self.visited: set[str] = set()

    def walk(self, path: str, rel: str = "", hidden: bool = False) -> None:
        real = os.path.realpath(path)
        if real in self.visited:
            self.files.append((rel, "symlink loop (a folder that contains itself)", 0, 0))
            return
        self.visited.add(real)
        try:
            self.mtimes[rel] = os.stat(path).st_mtime_ns
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            self.files.append((rel, f"unreadable: {e.strerror or e}", 0, 0))
            return
        self.folders[rel] = {e.name for e in entries if e.is_dir()}
        for e in entries:
            self._entry(e, f"{rel}/{e.name}" if rel else e.name, hidden or e.name.startswith("."))

    def _entry(self, e: os.DirEntry, rel: str, hidden: bool) -> None:
        link = e.is_symlink()
        if link:
            target = os.path.realpath(e.path)
            if not os.path.exists(target):
                return self.files.append((rel, "unreadable: broken symlink", 0, 0))
            if not self.follow and not _inside(target, self.root_real):
                return self.files.append((rel, f"symlink leads outside {self.root_name} ({self.follow_hint})", 0, 0))
        if e.is_dir():
            if link and not self.follow:
                return self.files.append((rel, f"symlink to a folder ({self.follow_hint})", 0, 0))
            return self.walk(e.path, rel, hidden)
        if hidden or is_ignored(Path(e.name)):
            return self.files.append((rel, "ignored", 0, 0))
        if not e.is_file():
            return self.files.append((rel, "unreadable: not a regular file", 0, 0))
        if not self.stat:
            return self.files.append((rel, "", 0, 0))
        st = e.stat()
        self.files.append((rel, "", st.st_size, st.st_mtime_ns))


def scan_collection(src: Path, wanted: list[str], follow_symlinks: bool, val_fraction: float) -> Collection:
    """Every file under SRC's (chosen) class folders with its fate, the split decided, and a
    fingerprint of names, sizes and times."""
    src = Path(src)
    names = _class_names(src, wanted)
    src_real = os.path.realpath(src)
    coll = Collection(root=src, classes=names, splits={"train": [], "val": []})
    coll.unclassified = sum(1 for p in src.iterdir() if not p.is_dir())
    h = hashlib.sha256()
    for ci, name in enumerate(names):
        walker = TreeWalker(src_real, follow_symlinks)
        class_dir = src / name
        target = os.path.realpath(class_dir)
        if class_dir.is_symlink() and not follow_symlinks and not _inside(target, src_real):
            walker.files.append((name, "symlink leads outside SRC (--follow-symlinks packs it)", 0, 0))
        else:
            walker.walk(str(class_dir), name, False)
        coll.seen[name] = len(walker.files)
        coll.ignored[name] = 0
        for rel, fate, size, mtime in walker.files:
            h.update(os.fsencode(rel) + f"\0{fate}\0{size}\0{mtime}\n".encode())
            if fate == "ignored":
                coll.ignored[name] += 1
            elif fate:
                coll.skipped.append({"path": rel, "reason": fate, "cls": ci})
            else:
                coll.splits["val" if is_val(rel, val_fraction) else "train"].append(Entry(rel, ci, name))
    if not any(coll.splits.values()) and not coll.skipped:
        raise UserError(f"SRC {src} holds no image files in its class folders ({', '.join(names)})")
    for split in coll.splits.values():
        # Shuffled by a hash of the path, so every shard mixes the classes (and the order is stable).
        split.sort(key=lambda e: _digest("order", e.rel))
    coll.fingerprint = h.hexdigest()
    return coll

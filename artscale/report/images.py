"""This module picks the images `artscale report` shows and writes their thumbnails beside index.html.

The selection is bounded and stable; the thumbnails sit beside the page so that the report folder
can be copied anywhere.

A thumbnail's name comes from its source's path, size and modification time, so a rerun keeps
the ones whose source did not change and makes new ones for the rest; `prune` then removes those
the new index.html no longer shows. Sources are opened through artscale.data.images only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from artscale.core.atomic import open_folder, regular_file, write_atomic, write_json_atomic
from artscale.core.system import usable_cores
from artscale.data.images import SkipImage, encode_image, load_image
from artscale.report.html import Shown

THUMBS = "thumbs"
INDEX = "thumbs.json"  # thumbnail name -> [width, height, source width, source height]
PNG_UP_TO = 64  # a thumbnail this small stays PNG (crisp when drawn enlarged); larger ones are JPEG


def spread(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1: the first, the last and an even spread between (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0] if n else []
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def select(groups: dict[str, list], max_shown: int, per_folder: int) -> tuple[list[tuple[str, object]], int]:
    """At most `max_shown` items over the groups (folders, in their order): per folder the first and an
    even spread of at most `per_folder`; with more folders than `max_shown`, an even spread of folders.
    Returns [(folder, item)] and how many shown per folder at most. Depends on the order alone: stable."""
    folders = list(groups)
    if len(folders) > max_shown:
        folders = [folders[i] for i in spread(len(folders), max_shown)]
    k = max(1, min(per_folder, max_shown // max(len(folders), 1)))
    return [(f, groups[f][i]) for f in folders for i in spread(len(groups[f]), k)], k


def _make(src: Path, out: Path, stem: str, side: int, lossless: bool) -> tuple[str, list[int]]:
    im, original = load_image(src, (side, side), resize="fit")
    fmt = "png" if lossless or max(im.size) <= PNG_UP_TO else "jpg"
    name = f"{stem}.{fmt}"
    write_atomic(out / THUMBS / name, encode_image(im, fmt, 85), root=out)
    return name, [im.width, im.height, *original]


class Thumbs:
    """Thumbnails under OUT/thumbs/, made in threads (Pillow decodes and encodes without the GIL)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.dir = self.out / THUMBS
        os.close(open_folder(self.out, THUMBS))  # made, or refused when it is a link
        try:
            known = json.loads((self.dir / INDEX).read_text()) if regular_file(self.dir / INDEX, self.out) else {}
        except (OSError, ValueError):
            known = {}
        self.known: dict[str, list[int]] = known if isinstance(known, dict) else {}
        self.used: dict[str, list[int]] = {}
        self.made = 0

    def _one(self, src: Path, side: int, lossless: bool, root: Path | None) -> tuple[str, list[int]] | str:
        """(thumbnail name, sizes), or why there is none."""
        if root is not None and not regular_file(src, root):  # a link planted in an output dir: not its output
            return "a symbolic link or not a file: not read" if os.path.lexists(src) else "not on disk"
        try:
            st = os.stat(src)
        except OSError:
            return "not on disk"
        key = f"{os.path.abspath(src)}|{st.st_size}|{st.st_mtime_ns}|{side}|{lossless}"
        stem = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        for name in (f"{stem}.png", f"{stem}.jpg"):
            if name in self.known and regular_file(self.dir / name, self.out):
                return name, self.known[name]
        try:
            name, sizes = _make(src, self.out, stem, side, lossless)
        except SkipImage as e:
            return str(e)
        self.known[name] = sizes  # another section showing the same file takes this one
        self.made += 1
        return name, sizes

    def make(
        self,
        sources: Sequence[Path],
        side: int,
        box: int,
        max_scale: int = 8,
        lossless: bool = False,
        root: Path | None = None,
    ) -> list[Shown]:
        """The thumbnails of `sources` (at most `side` pixels; PNG when `lossless`, else JPEG unless tiny),
        each drawn to fit `box` CSS pixels: a small image enlarged by a whole factor (pixelated, at most
        `max_scale`), a larger one shrunk to fit. With `root` (an output dir), only regular files
        reached from it through no symlink are read: a link there is not artscale's output."""
        unique = list(dict.fromkeys(sources))  # each file made once, by one thread
        with ThreadPoolExecutor(max(1, usable_cores())) as pool:
            done = dict(zip(unique, pool.map(lambda p: self._one(p, side, lossless, root), unique)))
        results = [done[p] for p in sources]
        shown = []
        for src, result in zip(sources, results):
            if isinstance(result, str):
                shown.append(Shown(missing=result, alt=src.name))
                continue
            name, sizes = result
            self.used[name] = sizes
            w, h = sizes[0], sizes[1]
            scale = max(1, min(max_scale, box // max(w, h)))
            if scale == 1 and max(w, h) > box:
                w, h = max(1, round(w * box / max(w, h))), max(1, round(h * box / max(w, h)))
            shown.append(Shown(f"{THUMBS}/{name}", w * scale, h * scale, scale > 1, alt=src.name))
        return shown

    def source_size(self, shown: Shown) -> tuple[int, int] | None:
        sizes = self.used.get(shown.src.rpartition("/")[2]) if shown.src else None
        return (sizes[2], sizes[3]) if sizes else None

    def prune(self) -> int:
        """Remove thumbnails the report no longer shows; keep the index of those it does."""
        removed = 0
        for p in self.dir.iterdir():
            if p.name != INDEX and p.name not in self.used:
                p.unlink(missing_ok=True)
                removed += 1
        write_json_atomic(self.dir / INDEX, self.used, root=self.out)
        return removed

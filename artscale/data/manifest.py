"""A shards dir's manifest.json, written by `artscale pack`: the one place that reads it.

Reading the bytes (read_manifest) and checking what they say (check_manifest) are apart, so that
a manifest fetched from elsewhere is checked by the same rules. A manifest is data someone else may
have written: every field is checked for its type and range, class names are safe folder names, and
shard names are the bare file names pack gives them, so a shard is never read outside the shards dir.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from artscale.core.checks import BadFile, class_names, field, mapping, printable
from artscale.core.errors import UserError

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"^(train|val)-\d{6,9}\.tar$")  # shard_writer's "{split}-%06d.tar"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_COUNT = 10**12  # samples (in a shard, a split, a class): far beyond any collection
MAX_BYTES = 2**50  # one shard's bytes: a petabyte
MAX_IMAGE_SIZE = 16384
_AGAIN = "; run `artscale pack` again with --force"


def is_shards_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(out: str | Path) -> dict:
    """The manifest of a shards dir, checked (check_manifest); a UserError (one line) when it is
    missing, unreadable or breaks a rule."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found: is {out} a shards dir written by `artscale pack`?")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({printable(str(e))[:200]}){_AGAIN}") from None
    return check_manifest(manifest, path)


def _count(record: dict, key: str, path: Path, where: str, high: int = MAX_COUNT) -> int:
    return field(record, key, int, path, low=0, high=high, where=where)


def check_shard(s: Any, path: Path, where: str) -> dict:
    """One shard record (name, split, count, bytes, sha256) as pack writes it, else BadFile; `where`
    names it in the message (`shards[3]`). Its name is a bare file name: never a path elsewhere."""
    s = mapping(s, path, where)
    where += "."
    name = field(s, "name", str, path, where=where)
    if not SHARD_NAME.match(name):
        raise BadFile(
            path, f"{where}name {printable(repr(name))[:80]}", "is not a shard name pack writes (train-000000.tar)"
        )
    split = field(s, "split", str, path, where=where)
    if split != name.partition("-")[0]:
        raise BadFile(path, f"{where}split", f"{printable(repr(split))[:40]} does not match the name {name}")
    _count(s, "count", path, where)
    _count(s, "bytes", path, where, MAX_BYTES)
    if not SHA256.match(field(s, "sha256", str, path, where=where)):
        raise BadFile(path, f"{where}sha256", "is not 64 lowercase hex digits")
    return s


def check_manifest(manifest: Any, path: str | Path) -> dict:
    """`manifest` if it holds what pack writes (types, ranges, safe names), else BadFile naming `path`
    and the first field that breaks a rule. Keys pack does not write are left alone."""
    path = Path(path)
    m = mapping(manifest, path)
    for key in ("classes", "image_size", "image_format", "shards", "splits"):
        if key not in m:
            raise BadFile(path, key, f"is missing{_AGAIN}")
    classes = class_names(m["classes"], path)
    size = field(m, "image_size", int, path, low=8, high=MAX_IMAGE_SIZE)
    if size % 8:
        raise BadFile(path, "image_size", f"must be a multiple of 8, not {size}")
    if field(m, "image_format", str, path) not in ("jpg", "png"):
        raise BadFile(path, "image_format", f"must be jpg or png, not {printable(repr(m['image_format']))[:40]}")
    if not isinstance(m["shards"], list):
        raise BadFile(path, "shards", f"must be a list of shards, not {type(m['shards']).__name__}")
    names: set[str] = set()
    for i, s in enumerate(m["shards"]):
        if check_shard(s, path, f"shards[{i}]")["name"] in names:
            raise BadFile(path, f"shards[{i}].name", f"{s['name']} is listed twice")
        names.add(s["name"])
    splits = mapping(m["splits"], path, "splits")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise BadFile(path, "splits", f"names an unknown split {printable(repr(unknown[0]))[:40]} (known: train, val)")
    for split in SPLITS:
        where = f"splits.{split}."
        if split not in splits:
            raise BadFile(path, f"splits.{split}", "is missing")
        record = mapping(splits[split], path, f"splits.{split}")
        _count(record, "count", path, where)
        _count(record, "shards", path, where)
    for key in ("artscale_version", "source", "resize", "fingerprint"):
        field(m, key, str, path, default="")
    for key in ("ignored", "unclassified"):
        field(m, key, int, path, low=0, high=MAX_COUNT, default=0)
    mapping(m.get("settings", {}), path, "settings")
    per_class = mapping(m.get("per_class", {}), path, "per_class")
    for name, counts in per_class.items():
        if name not in classes:
            raise BadFile(path, f"per_class {printable(repr(name))[:80]}", "is not one of the classes")
        counts = mapping(counts, path, f"per_class.{name}")
        for key in ("seen", "packed", "skipped", "ignored"):
            _count(counts, key, path, f"per_class.{name}.")
    skipped = m.get("skipped", [])
    if not isinstance(skipped, list):
        raise BadFile(path, "skipped", f"must be a list, not {type(skipped).__name__}")
    for i, s in enumerate(skipped):
        s = mapping(s, path, f"skipped[{i}]")
        field(s, "path", str, path, where=f"skipped[{i}].")
        field(s, "reason", str, path, where=f"skipped[{i}].")
    return m


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records (name, count, bytes, sha256, ...) of one split, in order."""
    return [s for s in manifest["shards"] if s["split"] == split]


def shard_file(root: str | Path, shard: dict) -> Path:
    """The file of a (checked) shard record in the shards dir `root`; a UserError when it is a symlink:
    artscale reads shards inside the shards dir only, and a link may lead anywhere."""
    path = Path(root) / shard["name"]
    if path.is_symlink():
        raise UserError(f"{path} is a symlink; shards are read only as files inside {root} (copy the shard there)")
    return path

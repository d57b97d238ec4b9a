"""A shards dir's manifest.json, written by `artscale pack`: the one place that reads it."""

from __future__ import annotations

import json
from pathlib import Path

from artscale.core.errors import UserError
from artscale.data.store import exists, join, read_bytes

MANIFEST = "manifest.json"
REQUIRED = ("classes", "image_size", "image_format", "shards", "splits")


def is_shards_dir(path: str | Path) -> bool:
    return exists(join(path, MANIFEST))


def read_manifest(out: str | Path) -> dict:
    """The manifest of a shards dir; a UserError (one line) when it is missing or unreadable."""
    path = join(out, MANIFEST)  # a path, or a URL (artscale.data.store)
    if not exists(path):
        raise UserError(f"{path} not found: is {out} a shards dir written by `artscale pack`?")
    try:
        manifest = json.loads(read_bytes(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); run `artscale pack` again with --force") from None
    missing = [k for k in REQUIRED if k not in manifest]
    if not isinstance(manifest, dict) or missing:
        raise UserError(f"{path} lacks {', '.join(missing) or 'a mapping'}; run `artscale pack` again with --force")
    return manifest


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records (name, count, bytes, sha256, ...) of one split, in order."""
    return [s for s in manifest["shards"] if s["split"] == split]

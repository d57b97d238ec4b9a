"""Write a file so that a reader sees the old content or the new one, never half of it, even after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: bytes | str, *, tmp: Path | None = None, sync_dir: bool = False) -> None:
    """Write `data` (str as UTF-8) to `tmp` (default NAME.tmp beside it), fsync it, rename it over `path`.

    A failed write removes `tmp` and re-raises the OSError. `sync_dir` fsyncs the folder too, so
    the rename itself survives a power loss, for files whose loss would undo finished work."""
    path = Path(path)
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str | Path, data: Any, *, sort_keys: bool = True, tmp: Path | None = None) -> None:
    """`data` as indented JSON plus a newline, through write_atomic."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", tmp=tmp)

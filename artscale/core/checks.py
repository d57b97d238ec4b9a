"""Checks for what artscale reads back from files: a field's type and range, a name that becomes a path.

artscale trusts its own command line and nothing it reads. Every reader of a file format
(manifest, run dir, checkpoint state, metrics, report, ONNX metadata) validates it through these
helpers, so that a bad file is one line naming the file and the field (a UserError, exit 2).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artscale.core.errors import UserError

MAX_COMPONENT_BYTES = 200  # a file system allows 255; outputs add an extension and temporary names a prefix
_MISSING = object()


class BadFile(UserError):
    """A file artscale wrote (or should have) that does not hold what its format says."""

    def __init__(self, path: str | Path, field: str, problem: str) -> None:
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field} {problem}")


def printable(text: str) -> str:
    """`text` with control characters (ANSI escapes, newlines) shown escaped, for one-line messages."""
    if all(unicodedata.category(c)[0] != "C" for c in text):
        return text
    return "".join(c if unicodedata.category(c)[0] != "C" else repr(c)[1:-1] for c in text)


def mapping(value: Any, path: str | Path, field: str = "the file") -> dict:
    """`value` if it is a JSON object (a dict with string keys), else BadFile."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise BadFile(path, field, f"is not a mapping of names to values (got {type(value).__name__})")
    return value


def field(
    record: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    path: str | Path,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    default: Any = _MISSING,
    where: str = "",
) -> Any:
    """record[key], checked: present (or `default`), of `kind` (bool is never an int), finite, in [low, high].

    `low_open` makes the lower bound exclusive (lr > 0). `where` prefixes the field's name in the
    message (`shards[3].`), so a nested field is named whole."""
    name = f"{where}{key}"
    if key not in record:
        if default is not _MISSING:
            return default
        raise BadFile(path, name, "is missing")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and int not in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise BadFile(path, name, f"must be {want}, not {type(value).__name__} {printable(repr(value))[:60]}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadFile(path, name, f"must be a finite number, not {value}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and (value <= low if low_open else value < low):
            raise BadFile(path, name, f"must be {'>' if low_open else '>='} {low}, not {value}")
        if high is not None and value > high:
            raise BadFile(path, name, f"must be <= {high}, not {value}")
    return value


def safe_component(name: Any, path: str | Path, field_name: str = "class name") -> str:
    """`name` if it can be one path component on any system artscale runs on, else BadFile.

    A class or shard name read from a file becomes a folder or file name: it must not climb out
    (`..`, `/`, `\\`), hide (a leading dot), carry control characters (terminal escapes, newlines)
    or exceed what a file system and a temporary name around it allow."""
    if not isinstance(name, str):
        raise BadFile(path, field_name, f"must be a string, not {type(name).__name__}")
    shown = printable(repr(name))[:80]
    if not name or name.strip() != name:
        problem = "is empty or starts or ends with white space"
    elif name.startswith(".") or "/" in name or "\\" in name:
        problem = "must be one folder name (no '/', '\\' or leading '.')"
    elif any(unicodedata.category(c)[0] == "C" for c in name):
        problem = "holds control characters"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
        problem = f"is longer than {MAX_COMPONENT_BYTES} bytes"
    else:
        return name
    raise BadFile(path, f"{field_name} {shown}", problem)


MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a model embeds one vector per class


def class_names(value: Any, path: str | Path, field_name: str = "classes") -> list[str]:
    """`value` if it is a list of distinct class names, each one safe path component, else BadFile.

    A model's or a manifest's classes become sample's output folders and eval's input folders."""
    if not isinstance(value, list):
        raise BadFile(path, field_name, f"must be a list of class names, not {type(value).__name__}")
    if len(value) > MAX_CLASSES:
        raise BadFile(path, field_name, f"lists {len(value):,} classes, more than {MAX_CLASSES:,}")
    seen: set[str] = set()
    for i, name in enumerate(value):
        safe_component(name, path, f"{field_name}[{i}]")
        if name in seen:
            raise BadFile(path, f"{field_name}[{i}]", f"{printable(repr(name))[:80]} is listed twice")
        seen.add(name)
    return value

"""This module writes the output files of generate and sample, and their reports.

Image formats, written whole or not at all; the names a sampling run gives its images; the reports:
one per shard, then merged into one.

Both commands' merges live here, on one reader of the shard reports: a missing, unreadable or
foreign shard report is one line naming each such file, never a traceback, and no report.json
is written (the merge job fails, so the array's failure is not hidden behind a merged report).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from artscale.contracts.run_files import check_distilled
from artscale.core.atomic import regular_files, write_atomic, write_json_atomic
from artscale.core.checks import BadFile, class_names, mapping, printable, safe_component
from artscale.core.checks import field as checked
from artscale.core.errors import UserError
from artscale.data.images import encode_image, resize_image

EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
REPORT_NAME = "report.json"  # a whole run's report, or the merge of its shards'
SHARD_REPORT = re.compile(r"^report-(\d+)-of-(\d+)\.json$")
SHARD_REPORT_GLOB = "report-*-of-*.json"
NAME_DIGITS = 8  # sample's file names: 00000012.png


def write_image(
    out_dir: Path, rel: str, pixels: np.ndarray, original: tuple[int, int] | None, fmt: str, quality: int
) -> None:
    """OUT/rel, through write_atomic rooted at OUT: never through a symlink inside OUT, never outside it."""
    im = Image.fromarray(pixels, "RGB")
    if original and im.size != original:
        im = resize_image(im, original)
    data = encode_image(im, fmt, quality)
    path = out_dir / rel
    try:
        write_atomic(path, data, root=out_dir)
    except OSError as e:  # a full disk, a quota, a read-only mount: the run stops, what is written stays
        raise UserError(
            f"cannot write {path}: {e.strerror or e}; the outputs written so far are kept, run again to continue"
        ) from None


def done(out_dir: Path, rels: list[str]) -> list[bool]:
    """Whether each output OUT/rel is finished work: a regular file reached through no symlink. A link
    there (to an outside file) is not done: the run replaces it with the output."""
    return regular_files(out_dir, rels)


def report_name(num_shards: int, shard_index: int) -> str:
    """report.json for a whole run, report-I-of-K.json for shard I of K."""
    return REPORT_NAME if num_shards == 1 else f"report-{shard_index}-of-{num_shards}.json"


def write_report(out_dir: Path, report: dict) -> Path:
    """report.json (report-I-of-K.json for a shard), written atomically."""
    path = out_dir / report_name(report["num_shards"], report["shard_index"])
    write_json_atomic(path, report, sort_keys=False)
    return path


@dataclass(frozen=True)
class Item:
    """One image a sampling run makes: its class label, its index within the class (the noise key) and its file."""

    label: int
    index: int
    out: str


def plan(classes: list[str], class_name: str, count: int, ext: str, source: str | Path = "the model") -> list[Item]:
    """Every image of a sampling run in its fixed order: `all` is count images per class, in subfolders.

    The class names, read from `source` (a model, a report), become folder names: each must be one
    safe path component (a BadFile naming `source` otherwise)."""
    class_names(classes, source)
    if class_name == "all":
        return [Item(c, i, f"{name}/{i:0{NAME_DIGITS}d}{ext}") for c, name in enumerate(classes) for i in range(count)]
    if class_name not in classes:
        raise UserError(f"--class {class_name}: not one of the model's classes ({', '.join(classes)}) or all")
    label = classes.index(class_name)
    return [Item(label, i, f"{i:0{NAME_DIGITS}d}{ext}") for i in range(count)]


def shard_chunks(items: list[Item], batch_size: int, num_shards: int, shard_index: int) -> list[list[Item]]:
    """This shard's chunks: chunk j (positions j*B .. j*B+B-1 of the whole run) belongs to shard j mod K."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return chunks[shard_index::num_shards]


# What a shard report must hold for its merge to read it: key -> type.
GENERATE_FIELDS = {
    **dict.fromkeys(("inputs_seen", "written", "already_done", "skipped", "ignored"), int),
    "in_dir": str,
    "format": str,
    "skipped_files": list,
}
SAMPLE_FIELDS = {
    **dict.fromkeys(("written", "already_done", "images_in_shard", "count", "batch_size"), int),
    "class": str,
    "classes": list,
    "format": str,
}
# A sampling run's settings: every shard must have run the same.
RUN_KEYS = ("model", "class", "classes", "count", "seed", "steps", "sampler", "guidance", "batch_size", "format")
SAMPLING_KEYS = ("sampling_from", "passes_per_step", "distilled")  # where steps, sampler, guidance came from


# Timings and rates a report holds besides its counts: finite numbers >= 0.
REPORT_TIMES = ("wall_s", "wall_s_max", "img_per_s")
MAX_REPORT_NUMBER = 1e15


def check_report(rep: Any, path: Path) -> dict[str, Any]:
    """A generate or sample report.json (or a shard's): a JSON object whose counts are ints >= 0, whose
    timings are finite numbers >= 0, and whose class names are safe path components (sample makes a
    folder of each). BadFile (one line naming the field) where it is not; a missing key is the merge's
    business (`_read_shard` names what a shard report lacks)."""
    rep = mapping(rep, path)
    for key, kind in {**GENERATE_FIELDS, **SAMPLE_FIELDS, "images_in_run": int, "after_listing": int}.items():
        low, high = (0, MAX_REPORT_NUMBER) if kind is int else (None, None)
        checked(rep, key, kind, path, low=low, high=high, default=None)
    for key in REPORT_TIMES:
        checked(rep, key, float, path, low=0, high=MAX_REPORT_NUMBER, default=None)
    for i, name in enumerate(rep.get("classes") or []):
        safe_component(name, path, f"classes[{i}]")
    if rep.get("format") is not None and rep["format"] not in EXTENSIONS:
        raise BadFile(
            path, "format", f"must be one of {', '.join(EXTENSIONS)}, not {printable(repr(rep['format']))[:40]}"
        )
    _check_sampling_keys(rep, path, "")
    variation = checked(rep, "variation", dict, path, default=None)
    if variation is not None:
        _check_sampling_keys(mapping(variation, path, "variation"), path, "variation.")
    return rep


SAMPLING_SOURCES = ("flag", "model", "default")


def _check_sampling_keys(rep: dict[str, Any], path: Path, where: str) -> None:
    """sampling_from (each of sampler, steps, guidance: flag, model or default), passes_per_step (1 or 2) and
    distilled (a student's record, or null), where present."""
    sources = checked(rep, "sampling_from", dict, path, default=None, where=where)
    if sources is not None:
        for key, source in mapping(sources, path, f"{where}sampling_from").items():
            if key not in ("sampler", "steps", "guidance") or source not in SAMPLING_SOURCES:
                raise BadFile(
                    path,
                    f"{where}sampling_from",
                    f"maps sampler, steps and guidance to one of {', '.join(SAMPLING_SOURCES)}, "
                    f"not {printable(repr(key))[:30]}: {printable(repr(source))[:30]}",
                )
    checked(rep, "passes_per_step", int, path, low=1, high=2, default=None, where=where)
    check_distilled(rep.get("distilled"), path, f"{where}distilled")


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _read_shard(path: Path, shard: int, num_shards: int, kind: str, fields: dict[str, type]) -> dict | str:
    """Shard `shard`'s report, or what is wrong with it (a phrase naming the file)."""
    try:
        rep = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path} is missing: shard {shard} of {num_shards} did not finish"
    except (OSError, ValueError) as e:  # no permission, a folder, not UTF-8, not JSON (cut short by a full disk)
        return f"{path} is not a readable JSON report ({e})"
    if not isinstance(rep, dict):
        return f"{path} is not a {kind} report (not a JSON object)"
    try:
        check_report(rep, path)
    except BadFile as e:
        return str(e)
    lacking = [k for k, t in fields.items() if not isinstance(rep.get(k), t) or isinstance(rep.get(k), bool)]
    if lacking:
        return f"{path} is not a {kind} report (it lacks {', '.join(lacking)})"
    if rep["format"] not in EXTENSIONS:
        return f"{path} names an unknown format {rep['format']!r}"
    if (rep.get("shard_index"), rep.get("num_shards")) != (shard, num_shards):
        return f"{path} says shard {rep.get('shard_index')} of {rep.get('num_shards')}"
    return rep


def read_shard_reports(out_dir: Path, num_shards: int, sample: bool = False) -> list[dict[str, Any]]:
    """The K shard reports of OUT (report-I-of-K.json, I = 0..K-1), each checked to be one.

    A UserError, in one line, when any is missing, unreadable, not a report of this kind, or of
    another shard: it counts them, names the first few files with what is wrong, and says which
    shards to run again."""
    if num_shards < 1:
        raise UserError(f"--num-shards {num_shards}: need at least 1")
    kind, fields = ("sampling", SAMPLE_FIELDS) if sample else ("generation", GENERATE_FIELDS)
    reports, problems = [], []
    for i in range(num_shards):
        got = _read_shard(Path(out_dir) / report_name(num_shards, i), i, num_shards, kind, fields)
        (reports if isinstance(got, dict) else problems).append((i, got))
    if problems:
        shown = "; ".join(p for _, p in problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
        shards = _ranges([i for i, _ in problems])
        raise UserError(
            f"{len(problems)} of {num_shards} shard reports unusable: {shown}; run shard{'s' * (len(problems) > 1)} "
            f"{shards} again"
        )
    return [rep for _, rep in reports]


def merge_reports(out_dir: str | Path, num_shards: int, sample: bool = False) -> dict[str, Any]:
    """OUT/report-I-of-K.json (I = 0..K-1) into one report, checked against what the run had to make:
    the input tree for generate (see _merge_generate), the sampling plan for sample (_merge_sample)."""
    out_dir = Path(out_dir)
    reports = read_shard_reports(out_dir, num_shards, sample)
    return (_merge_sample if sample else _merge_generate)(out_dir, reports)


def write_merged(out_dir: str | Path, num_shards: int, sample: bool = False) -> dict[str, Any]:
    """merge_reports, then OUT/report.json written atomically."""
    merged = merge_reports(out_dir, num_shards, sample)
    write_json_atomic(Path(out_dir) / REPORT_NAME, merged)
    return merged


def _merge_generate(out_dir: Path, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Generate's shards, checked against the input tree (OUT/listing.jsonl when the array had one;
    files added since are counted in `after_listing`).

    UserError when a shard does not account for each of its inputs (written, already done, skipped
    with a reason, or ignored), when the shards together did not see exactly the files IN_DIR
    holds, or when an output is missing."""
    from artscale.data.listing import LISTING, files_after_listing, list_inputs, read_listing, shard_of

    num_shards = len(reports)
    counts = [k for k, t in GENERATE_FIELDS.items() if t is int]
    for i, rep in enumerate(reports):
        accounted = sum(rep[k] for k in counts[1:])
        if accounted != rep["inputs_seen"]:
            raise UserError(
                f"{out_dir / report_name(num_shards, i)}: {rep['inputs_seen']} inputs but {accounted} written, "
                "already done, skipped or ignored"
            )
    in_dirs = {rep["in_dir"] for rep in reports}
    if len(in_dirs) != 1:
        raise UserError(f"the shards read different input folders: {', '.join(sorted(in_dirs))}")
    in_dir = Path(in_dirs.pop())
    if not in_dir.is_dir():
        raise UserError(f"input folder {in_dir} not found (the merge checks every input against it)")
    ext, follow = EXTENSIONS[reports[0]["format"]], bool(reports[0].get("follow_symlinks", False))
    listing = read_listing(out_dir, in_dir, ext, follow)
    entries = listing.entries if listing is not None else list_inputs(in_dir, ext, follow)
    where = out_dir / LISTING if listing is not None else f"{in_dir} now"
    for i, rep in enumerate(reports):
        expected = sum(shard_of(e.rel, num_shards) == i for e in entries)
        if rep["inputs_seen"] != expected:
            raise UserError(f"shard {i} saw {rep['inputs_seen']} inputs but {where} holds {expected} for it")
    late = files_after_listing(listing) if listing is not None else []
    skipped = {s["path"] for rep in reports for s in rep["skipped_files"]}
    wanted = [e.out for e in entries if e.out and e.rel not in skipped]
    missing = [out for out, there in zip(wanted, done(out_dir, wanted)) if not there]
    if missing:
        raise UserError(f"{len(missing)} outputs are missing from {out_dir}, e.g. {missing[0]}")
    merged = {k: sum(rep[k] for rep in reports) for k in counts}
    merged.update(
        in_dir=str(in_dir),
        out_dir=str(out_dir),
        num_shards=num_shards,
        skipped_files=sorted((s for rep in reports for s in rep["skipped_files"]), key=lambda s: s["path"]),
        providers=sorted({rep.get("provider", "") for rep in reports}),
        wall_s_max=max(rep.get("wall_s", 0.0) for rep in reports),
        # files added to IN_DIR after the listing: not generated, named here (the first 1000)
        after_listing=len(late),
        after_listing_files=late[:1000],
        shards=[
            {k: rep.get(k) for k in ("shard_index", "inputs_seen", "written", "wall_s", "img_per_s", "provider")}
            for rep in reports
        ],
    )
    return merged


def _merge_sample(out_dir: Path, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Sample's shards, checked against the run's plan.

    UserError when the shards ran different runs, when a shard did not account for each index it
    owns (written or already there), or when an image file is missing."""
    num_shards, first = len(reports), reports[0]
    for i, rep in enumerate(reports[1:], 1):
        if any(rep.get(k) != first.get(k) for k in RUN_KEYS):
            raise UserError(
                f"{out_dir / report_name(num_shards, i)} is a different run than shard 0 "
                f"(one of {', '.join(RUN_KEYS)} differs)"
            )
    source = out_dir / report_name(num_shards, 0)
    items = plan(first["classes"], first["class"], first["count"], EXTENSIONS[first["format"]], source)
    for i, rep in enumerate(reports):
        owned = sum(map(len, shard_chunks(items, first["batch_size"], num_shards, i)))
        if rep["written"] + rep["already_done"] != owned or rep["images_in_shard"] != owned:
            raise UserError(
                f"shard {i}: {rep['written']} written + {rep['already_done']} already there, but it owns {owned} images"
            )
    missing = [it.out for it, there in zip(items, done(out_dir, [it.out for it in items])) if not there]
    if missing:
        raise UserError(f"{len(missing)} images are missing from {out_dir}, e.g. {missing[0]}")
    return {
        **{k: first.get(k) for k in RUN_KEYS},
        **{k: first[k] for k in SAMPLING_KEYS if k in first},
        "out_dir": str(out_dir),
        "images_in_run": len(items),
        "written": sum(r["written"] for r in reports),
        "already_done": sum(r["already_done"] for r in reports),
        "num_shards": num_shards,
        "providers": sorted({r.get("provider", "") for r in reports}),
        "wall_s_max": max(r.get("wall_s", 0.0) for r in reports),
        "shards": [
            {k: r.get(k) for k in ("shard_index", "written", "wall_s", "img_per_s", "provider")} for r in reports
        ],
    }

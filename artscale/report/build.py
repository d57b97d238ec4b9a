"""This module writes `artscale report PATH [--out DIR]`: a static page of a run dir or an output dir.

PATH is a run dir or an output dir of generate or sample (a merged SLURM one too); the report is one
index.html with its thumbnails beside it in thumbs/.

No server, script, font or file from elsewhere: the folder opens from a shared filesystem or a copy.
For a million outputs it stays small: thumbnails for a bounded, stable selection (per folder the
first and an even spread), in pages whose images load lazily. The outputs are known from
listing.jsonl, the input tree, or the sampling plan (names only: no file is opened or stat()ed
beyond the ones shown). index.html is written under a temporary name and renamed, so a rerun on a
grown run replaces it whole; thumbnails of unchanged sources are kept.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artscale import __version__
from artscale.core.atomic import regular_file, remove_tree, write_atomic
from artscale.core.errors import UserError
from artscale.infer.outputs import EXTENSIONS, REPORT_NAME, SHARD_REPORT, SHARD_REPORT_GLOB, check_report, plan
from artscale.report.html import GENERATOR, Tile, card, contact_sheet, esc, fmt, fmt_seconds, kpis, kv_table, note, page
from artscale.report.html import table as html_table
from artscale.report.images import Thumbs, select
from artscale.report.run import eval_card, run_section

THUMB_SIDE = 128  # contact-sheet thumbnails fit in this many pixels
MAX_SHOWN = 2000  # outputs shown at most, over all folders
PER_FOLDER = 48  # outputs shown per folder at most
PAGE_SIZE = 120  # outputs per page
MAX_LISTED = 1000  # skipped files named one by one
SHARDS_OPEN = 12  # more shard reports than this go in a closed table
SUMMED = ("inputs_seen", "written", "already_done", "skipped", "ignored")
IN_KPIS = {"inputs_seen", "written", "already_done", "skipped", "ignored", "images_in_run", "wall_s", "img_per_s"}


@dataclass(frozen=True)
class Limits:
    """How much of an output dir is shown: at most `max_shown` outputs, `per_folder` per folder, `page_size` a page."""

    max_shown: int = MAX_SHOWN
    per_folder: int = PER_FOLDER
    page_size: int = PAGE_SIZE


@dataclass
class Output:
    """An output dir: its report.json (None before a sharded run is merged) and the shards' reports."""

    path: Path
    kind: str  # "generate" or "sample"
    report: dict[str, Any] | None
    shards: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)

    @property
    def main(self) -> dict[str, Any]:
        """report.json; before the merge, the shards' reports added up (counts summed, the longest wall time)."""
        if self.report is not None:
            return self.report
        reports = [r for _, r in self.shards]
        own = ("shard_index", "images_in_shard", "provider", "wall_s", "img_per_s", "skipped_files")
        summed = {k: sum(r.get(k, 0) for r in reports) for k in SUMMED if k in reports[0]}
        return {
            **{k: v for k, v in reports[0].items() if k not in own},
            **summed,
            "providers": sorted({str(r.get("provider")) for r in reports}),
            "wall_s_max": max(r.get("wall_s", 0.0) for r in reports),
        }


def _read_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path} is not a readable report ({e}); run the command that wrote it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a report of `artscale generate` or `artscale sample`")
    return check_report(data, path)


def _kind(path: Path, report: dict[str, Any]) -> str:
    if "inputs_seen" in report:
        return "generate"
    if "images_in_run" in report:
        return "sample"
    raise UserError(f"{path} is not a report of `artscale generate` or `artscale sample`")


def read_output(path: Path) -> Output | None:
    """The output dir at `path`, or None when it holds no report.json nor report-I-of-K.json."""
    shards = []
    for p in sorted(path.glob(SHARD_REPORT_GLOB)):
        if m := SHARD_REPORT.match(p.name):
            shards.append(((int(m.group(2)), int(m.group(1))), p))
    shard_reports = [(p, _read_report(p)) for _, p in sorted(shards)]
    report = _read_report(path / REPORT_NAME) if regular_file(path / REPORT_NAME, path) else None
    if report is None and not shard_reports:
        return None
    first, where = (report, path / REPORT_NAME) if report is not None else shard_reports[0][::-1]
    return Output(path, _kind(where, first), report, shard_reports)


def _source(path: Path) -> tuple[str, Any]:
    """("output", Output) or ("run", path); a UserError (one line) for anything else."""
    if not path.exists():
        raise UserError(f"{path} not found")
    if not path.is_dir():
        raise UserError(f"{path} is a file: `artscale report` takes a run dir, or an output dir of generate or sample")
    output = read_output(path)
    if output is not None:
        return "output", output
    if (path / "listing.jsonl").is_file():
        raise UserError(f"{path} holds listing.jsonl but no report yet: its generation has not run")
    from artscale.contracts.run_dir import STATE_NAME, is_run_dir

    if (path / STATE_NAME).is_file():
        raise UserError(f"{path} is a checkpoint: report its run dir ({path.parent.parent})")
    if is_run_dir(path):
        return "run", path
    raise UserError(
        f"{path} is neither a run dir (config.json, metrics.jsonl, checkpoints/) nor an output dir of "
        "`artscale generate` or `artscale sample` (report.json): nothing to report"
    )


def default_out(path: Path, kind: str) -> Path:
    """RUN_DIR/report for a run dir; OUT_DIR-report beside an output dir, since in it the thumbnails
    would be taken for outputs (by `artscale eval`, or a generate over that folder)."""
    if kind == "run":
        return path / "report"
    path = path.resolve()  # `artscale report .` too
    return path.with_name(path.name + "-report")


def _check_out(out: Path, outputs: Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()):
        index = out / "index.html"
        head = index.read_text(errors="replace")[:600] if index.is_file() else ""
        if GENERATOR not in head:
            raise UserError(f"--out {out} is a folder that holds no artscale report: give an empty or new folder")
    resolved = out.resolve()
    for o in outputs:
        if o.resolve() == resolved or o.resolve() in resolved.parents:
            raise UserError(
                f"--out {out} is inside the output dir {o}: its thumbnails would count as outputs there; "
                "choose another folder"
            )


# ---- output dirs ----------------------------------------------------------------------------------


def _numbers(out: Output) -> str:
    """report.json's figures: counts first, then the settings, as written."""
    rep = out.main
    if out.kind == "generate":
        counts = [("inputs seen", rep.get("inputs_seen")), ("written", rep.get("written"))]
        counts += [
            ("already done", rep.get("already_done")),
            ("skipped", rep.get("skipped")),
            ("ignored", rep.get("ignored")),
        ]
    else:
        counts = [("images in run", rep.get("images_in_run")), ("written", rep.get("written"))]
        counts += [("already there", rep.get("already_done"))]
    wall = rep.get("wall_s", rep.get("wall_s_max"))
    rate = rep.get("img_per_s")
    if rate is None and out.shards:
        rate = sum(r.get("img_per_s", 0) for _, r in out.shards)
    counts += [("img/s" + (" (shards summed)" if "img_per_s" not in rep else ""), rate)]
    counts += [
        (
            "wall time" + (" (longest shard)" if "wall_s" not in rep else ""),
            fmt_seconds(wall) if wall is not None else None,
        )
    ]
    body = kpis(counts)
    if out.report is None:
        body += note(
            f"not merged yet: {len(out.shards)} shard reports, no report.json (the merge job writes it)", warn=True
        )
    skip = {"skipped_files", "shards", "after_listing_files", "variation"}
    settings = [(k, v) for k, v in rep.items() if k not in skip and not isinstance(v, dict | list) or k == "providers"]
    settings += [(f"variation: {k}", v) for k, v in (rep.get("variation") or {}).items()]
    body += kv_table([(k, v) for k, v in settings if k not in IN_KPIS])
    if rep.get("after_listing"):
        late = rep.get("after_listing_files", [])
        body += note(
            f"{rep['after_listing']:,} files were added to the input tree after the listing and were not "
            f"generated, e.g. {', '.join(late[:3])}",
            warn=True,
        )
    return card("Numbers (report.json)", body, "numbers")


def _shards_card(out: Output) -> str:
    if not out.shards:
        return ""
    head = [
        "shard",
        "inputs seen" if out.kind == "generate" else "images",
        "written",
        "already done",
        "skipped",
        "provider",
        "wall time",
        "img/s",
    ]
    rows = []
    for path, r in out.shards:
        rows.append(
            [
                path.name,
                fmt(r.get("inputs_seen", r.get("images_in_shard"))),
                fmt(r.get("written")),
                fmt(r.get("already_done")),
                fmt(r.get("skipped", 0)),
                r.get("provider", ""),
                fmt_seconds(r["wall_s"]) if "wall_s" in r else "-",
                fmt(r.get("img_per_s")),
            ]
        )
    shards = html_table(head, rows, [False, True, True, True, True, False, True, True])
    walls = [r["wall_s"] for _, r in out.shards if isinstance(r.get("wall_s"), int | float)]
    body = note(f"wall time from {fmt_seconds(min(walls))} to {fmt_seconds(max(walls))}") if walls else ""
    if len(rows) > SHARDS_OPEN:
        body += f"<details><summary>all {len(rows)} shard reports</summary>{shards}</details>"
    else:
        body += shards
    return card(f"Shards ({len(out.shards)})", body, "shards")


def _skipped_card(out: Output) -> str:
    files = out.main.get("skipped_files")
    if files is None and out.shards:
        files = [s for _, r in out.shards for s in r.get("skipped_files", [])]
    if not files:
        return ""
    reasons: dict[str, list[str]] = {}
    for s in files:
        reasons.setdefault(s["reason"].split(":")[0].split(" (")[0], []).append(s["path"])
    rows = [[r, fmt(len(p)), ", ".join(p[:3]) + (" ..." if len(p) > 3 else "")] for r, p in sorted(reasons.items())]
    body = html_table(["reason", "files", "e.g."], rows, [False, True])
    listed = html_table(["file", "reason"], [[s["path"], s["reason"]] for s in files[:MAX_LISTED]])
    more = f" (the first {MAX_LISTED:,}; report.json names all)" if len(files) > MAX_LISTED else ""
    body += f"<details><summary>all {len(files):,} skipped files{more}</summary>{listed}</details>"
    return card(f"Skipped ({len(files):,})", body, "skipped")


def _generate_pairs(out: Output) -> tuple[dict[str, list[tuple[str, str]]], Path | None, str]:
    """Outputs by folder as (input rel, output rel), the input folder when it is here, and where the
    names came from: listing.jsonl, else a walk of the input tree, else of the output dir (no inputs)."""
    from artscale.data.listing import list_inputs, load_listing

    reports = ([out.report] if out.report else []) + [r for _, r in out.shards]
    skipped = {s["path"] for r in reports for s in r.get("skipped_files", [])}
    in_dir = Path(out.main.get("in_dir", ""))
    fmt_ = next((r["format"] for r in reports if r.get("format") in EXTENSIONS), "png")
    follow = any(r.get("follow_symlinks") for r in reports)
    listing = load_listing(out.path)
    if listing is not None:
        entries, where = listing.entries, "listing.jsonl"
    elif in_dir.is_dir():
        entries, where = list_inputs(in_dir, EXTENSIONS[fmt_], follow), f"the input tree {in_dir}"
    else:
        return _walk_outputs(out.path), None, f"the output dir (its input tree {in_dir} is not here)"
    groups: dict[str, list[tuple[str, str]]] = {}
    for e in entries:
        if e.out and e.rel not in skipped:
            groups.setdefault(e.out.rpartition("/")[0], []).append((e.rel, e.out))
    return groups, (in_dir if in_dir.is_dir() else None), where


def _walk_outputs(root: Path) -> dict[str, list[tuple[str, str]]]:
    from artscale.data.images import IMAGE_EXTENSIONS

    groups: dict[str, list[tuple[str, str]]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root).replace(os.sep, "/").removeprefix(".")
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                r = f"{rel}/{name}" if rel else name
                groups.setdefault(rel, []).append(("", r))
    return groups


def _sample_items(out: Output) -> dict[str, list[tuple[str, str]]]:
    rep = out.main
    groups: dict[str, list[tuple[str, str]]] = {}
    source = out.path / REPORT_NAME if out.report is not None else out.shards[0][0]
    for it in plan(list(rep["classes"]), rep["class"], int(rep["count"]), EXTENSIONS[rep.get("format", "png")], source):
        groups.setdefault(it.out.rpartition("/")[0] or rep["class"], []).append(("", it.out))
    return groups


def _sheet_card(out: Output, thumbs: Thumbs, limits: Limits) -> str:
    in_dir = None
    if out.kind == "generate":
        groups, in_dir, where = _generate_pairs(out)
        what = "outputs"
    else:
        groups, where, what = _sample_items(out), "the sampling plan (report.json)", "images"
    total = sum(map(len, groups.values()))
    picked, k = select(groups, limits.max_shown, limits.per_folder)
    outputs = thumbs.make([out.path / o for _, (_, o) in picked], THUMB_SIDE, THUMB_SIDE, root=out.path)
    inputs = thumbs.make([in_dir / i for _, (i, _) in picked], THUMB_SIDE, THUMB_SIDE) if in_dir else []
    tiles = []
    for n, (folder, (rel, o)) in enumerate(picked):
        shown = [inputs[n], outputs[n]] if inputs else [outputs[n]]
        tiles.append(Tile(folder, (rel or o).rpartition("/")[2], shown))
    folders = len({f for f, _ in picked})
    unread = sum(not s.src for s in outputs)
    head = note(
        f"showing {len(picked):,} of {total:,} {what} in {folders:,} of {len(groups):,} folders: per folder the first "
        f"and an even spread (at most {k}); names from {where}" + ("; each input beside its output" if inputs else "")
    )
    if unread:
        head += note(f"{unread:,} of the shown {what} could not be read (marked in place)", warn=True)
    title = "Contact sheet by input folder" if out.kind == "generate" else "Contact sheet by class folder"
    return card(title, head + contact_sheet(tiles, THUMB_SIDE, limits.page_size, what), "sheet")


def output_section(out: Output, thumbs: Thumbs, limits: Limits) -> tuple[str, str]:
    parts = [
        _numbers(out),
        _shards_card(out),
        _skipped_card(out),
        eval_card(sorted(p for p in out.path.glob("eval*.json") if regular_file(p, out.path))),
    ]
    parts.append(_sheet_card(out, thumbs, limits))
    what = "generation" if out.kind == "generate" else "sampling"
    return f"{what} output: {out.path.name}", "".join(p for p in parts if p)


# ---- the page -------------------------------------------------------------------------------------


def _build(out: Path, paths: list[Path], sources: list, limits: Limits) -> Thumbs:
    """index.html and thumbs/ of `sources` in OUT; the thumbnails made, for the summary line."""
    out.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbs(out)
    sections, toc = [], []
    for n, ((kind, src), path) in enumerate(zip(sources, paths), 1):
        title, body = run_section(path, thumbs) if kind == "run" else output_section(src, thumbs, limits)
        anchor = f"s{n}"
        body = re.sub(r'id="([a-z]+)"', lambda m, a=anchor: f'id="{a}-{m.group(1)}"', body)
        sections.append(
            f'<section class="source" id="{anchor}"><h2>{esc(title)}</h2>'
            f'<p class="path">{esc(path.resolve())}</p>{body}</section>'
        )
        toc.append((anchor, title))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    title = "artscale report" + (f": {paths[0].name}" if len(paths) == 1 else "")
    html = page(title, f"written {stamp} by artscale {__version__}", toc, sections)
    write_atomic(out / "index.html", html)
    thumbs.prune()
    return thumbs


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, limits: Limits = Limits()) -> Path:
    """Write the report of `paths` (run dirs and output dirs, one section each) to OUT/index.html."""
    started = time.perf_counter()
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("nothing to report: give a run dir or an output dir")
    sources = [_source(p) for p in paths]
    out = Path(out) if out is not None else default_out(paths[0], sources[0][0])
    _check_out(out, [s.path for kind, s in sources if kind == "output"])
    existed = out.is_dir()
    new = not existed or not any(out.iterdir())
    try:
        thumbs = _build(out, paths, sources, limits)
    except BaseException:
        if new:  # nothing half-built stays behind: a rerun finds the folder as it was, and works
            for made in [*out.iterdir()] if existed else [out]:
                remove_tree(made)
        raise
    index = out / "index.html"
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"report: {index} ({len(thumbs.used):,} thumbnails, {thumbs.made:,} new; {size / 1e6:.1f} MB; "
        f"{time.perf_counter() - started:.1f} s)"
    )
    return index

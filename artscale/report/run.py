"""This module writes the run-dir part of `artscale report`.

It shows the config, the data, the metrics as plots, the sample grids, the checkpoints, FID/KID, time
and throughput. The run dir is read by artscale.contracts.run_dir.read_run_dir (as `artscale info`)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from artscale.core.checks import field as checked
from artscale.core.checks import mapping, printable
from artscale.data.grids import PAD, tile_size
from artscale.report.html import Series, card, esc, fmt, fmt_seconds, grid_figure, kpis, kv_table, line_plot, note
from artscale.report.html import table as html_table
from artscale.report.images import Thumbs, spread

MAX_GRIDS = 30  # sample grids shown: the first, the last and an even spread between
GRID_SIDE = 1280  # a grid is kept up to this size (8 columns of 128 px pieces, grids.py); larger ones are shrunk
GRID_BOX = 560  # and drawn up to this wide, small ones enlarged by a whole factor
LOG_WHEN = ("loss", "mse", "perceptual", "grad_norm", "fid", "kid")  # plotted on a log scale when positive
SKIP_KEYS = {"step", "epoch"}
AT_TIMESTEP = re.compile(r"^(.+)_t(\d+)$")
ORDER = ("loss", "mse", "perceptual", "lr", "grad_norm", "img_per_s", "data_wait_s", "skipped_samples")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _distances(record: dict[str, Any], path: Path, where: str) -> None:
    """FID and KID figures: finite numbers (or null, where a side had too few images), counts >= 0."""
    for key in ("fid", "kid_mean", "kid_std"):
        if record.get(key) is not None:
            checked(record, key, float, path, where=where)
    for key in ("images", "generated", "real", "skipped"):
        if not isinstance(record.get(key), dict):
            checked(record, key, int, path, low=0, default=None, where=where)


def check_eval(r: dict[str, Any], path: Path) -> dict[str, Any]:
    """An eval.json of `artscale eval` (artscale.metrics.fid): BadFile naming the field where it is not one."""
    _distances(r, path, "")
    for side in ("generated", "real"):
        _distances(mapping(checked(r, side, dict, path), path, side), path, f"{side}.")
    per = mapping(checked(r, "per_class", dict, path, default={}), path, "per_class")
    for name, m in per.items():
        _distances(mapping(m, path, f"per_class.{printable(name)[:40]}"), path, f"per_class.{printable(name)[:40]}.")
    return r


def eval_card(paths: list[Path]) -> str:
    """FID and KID from the eval.json files `artscale eval` wrote (other JSON files are passed over)."""
    found = [
        (p, check_eval(r, p)) for p in paths if (r := read_json(p)) is not None and "fid" in r and "generated" in r
    ]
    if not found:
        return ""
    body = []
    for path, r in found:
        g, real = r.get("generated", {}), r.get("real", {})
        kid = f"{fmt(r.get('kid_mean'))} ± {fmt(r.get('kid_std'))}" if r.get("kid_mean") is not None else "-"
        items = [
            ("FID", r.get("fid") if r.get("fid") is not None else r.get("note", "-")),
            ("KID", kid),
            ("generated images", g.get("images")),
            ("real images", f"{fmt(real.get('images'))} ({real.get('split', '?')} split of {real.get('shards', '?')})"),
            ("Inception weights", r.get("inception_weights")),
        ]
        body.append(f"<p class='mono'>{esc(path.name)}</p>{kv_table(items)}")
        if str(r.get("inception_weights")) == "random":
            body.append(note("random Inception weights: these figures mean nothing (a test setup)", warn=True))
        per = r.get("per_class") or {}
        if per:
            rows = [
                [n, fmt(m.get("fid")), fmt(m.get("kid_mean")), fmt(m.get("generated")), fmt(m.get("real"))]
                for n, m in per.items()
            ]
            body.append(html_table(["class", "FID", "KID", "generated", "real"], rows, [False, True, True, True, True]))
    return card("FID and KID", "".join(body), "eval")


def _series(metrics: list[dict], classes: list[str]) -> tuple[list[tuple[str, list[Series]]], dict[str, float]]:
    """Plots (title, series) of every varying metric, per-class keys (`a/b/CLASS`) together in one plot;
    and the metrics that never changed, with their value."""
    values: dict[str, list[tuple[float, float]]] = {}
    for m in metrics:
        step = m.get("step")
        if not isinstance(step, int | float):
            continue
        for k, v in m.items():
            if k in SKIP_KEYS or isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                continue
            values.setdefault(k, []).append((float(step), float(v)))
    constant = {k: pts[0][1] for k, pts in values.items() if len({y for _, y in pts}) == 1 and len(pts) > 1}
    groups: dict[str, list[Series]] = {}
    for k, pts in values.items():
        if k in constant:
            continue
        prefix, _, last = k.rpartition("/")
        if prefix and last in classes:
            groups.setdefault(f"{prefix} per class", []).append(Series(last, pts))
        elif m := AT_TIMESTEP.match(k):  # diffusion's val/loss_t100 ... val/loss_t900
            groups.setdefault(f"{m.group(1)} by timestep", []).append(Series(f"t={m.group(2)}", pts))
        else:
            groups.setdefault(k, []).insert(0, Series(k, pts))
    for title, series in groups.items():  # the overall figure beside its classes: `eval/kid` in `eval/kid per class`
        base = title.removesuffix(" per class")
        if title != base and base in groups:
            series.insert(0, Series("all classes", groups[base][0].points))
    for title in [t for t in groups if t.endswith(" per class")]:
        groups.pop(title.removesuffix(" per class"), None)

    def rank(title: str) -> tuple[int, str]:
        """The training figures in ORDER, then validation, then the rest (eval/...)."""
        base = title.removesuffix(" per class")
        return (ORDER.index(base) if base in ORDER else len(ORDER) + (0 if base.startswith("val/") else 1)), title

    return sorted(groups.items(), key=lambda kv: rank(kv[0])), constant


def _plots(metrics: list[dict], classes: list[str]) -> str:
    plotted, constant = _series(metrics, classes)
    if not plotted and not constant:
        return note("nothing logged yet (metrics.jsonl is empty or missing)")
    figures = []
    for title, series in plotted:
        ys = [y for s in series for _, y in s.points]
        positive = bool(ys) and min(ys) > 0
        loss_like = positive and any(w in title for w in LOG_WHEN) and max(ys) / min(ys) >= 3
        ylabel = title.removesuffix(" per class").removesuffix(" by timestep")
        figures.append(line_plot(series, title, ylabel, log=True if loss_like else None))
    out = f'<div class="plots">{"".join(figures)}</div>'
    if constant:
        out += note("the same at every step: " + ", ".join(f"{k} {fmt(v)}" for k, v in sorted(constant.items())))
    return out


def _config_card(config: dict[str, Any] | None) -> str:
    if not config:
        return card("Config", note("no config.json in this run dir"), "config")
    from artscale.train.config import TrainConfig

    defaults = TrainConfig(objective=config.get("objective", "reconstruct")).to_dict()
    changed = [k for k in config if k not in defaults or config[k] != defaults[k]]
    rest = [k for k in config if k not in changed]
    body = note(f"{len(changed)} keys differ from the defaults (bold); the other {len(rest)} are the defaults")
    body += kv_table([(k, config[k]) for k in changed], set(changed))
    if rest:
        defaults_table = kv_table([(k, config[k]) for k in rest])
        body += f"<details><summary>the {len(rest)} default keys</summary>{defaults_table}</details>"
    return card("Config", body, "config")


def _data_card(config: dict[str, Any] | None) -> tuple[str, list[str]]:
    from artscale.core.errors import UserError
    from artscale.data.manifest import is_shards_dir, read_manifest

    data = str((config or {}).get("data", ""))
    try:  # data at a URL (s3://...) is read through artscale.data.store; without credentials, a note
        if not data or not is_shards_dir(data):
            return card(
                "Data", note(f"data {data or '(not set)'}: no manifest.json here (a URL pattern, or trained elsewhere)")
            ), []
        m = read_manifest(data)
    except UserError as e:
        return card("Data", note(str(e), warn=True)), []
    tr, va = m["splits"].get("train", {}), m["splits"].get("val", {})
    items = [
        ("shards", data),
        ("images", f"{m['image_size']} px {m['image_format']} ({m.get('resize', '?')})"),
        ("train samples", tr.get("count")),
        ("val samples", va.get("count")),
        ("skipped", len(m.get("skipped", []))),
        ("ignored", m.get("ignored", 0)),
    ]
    per = m.get("per_class", {})
    rows = [
        [n, fmt(c.get("seen")), fmt(c.get("packed")), fmt(c.get("skipped")), fmt(c.get("ignored"))]
        for n, c in per.items()
    ]
    body = kv_table(items) + html_table(
        ["class", "seen", "packed", "skipped", "ignored"], rows, [False, True, True, True, True]
    )
    return card("Data", body, "data"), list(m["classes"])


def _grids_card(run: Any, thumbs: Thumbs, classes: list[str], size: int, objective: str) -> str:
    if not run.samples:
        return card(
            "Sample grids", note("no sample grids yet (samples/step-*.png, every sample_every steps)"), "samples"
        )
    picked = [run.samples[i] for i in spread(len(run.samples), MAX_GRIDS)]
    shown = thumbs.make([p for _, p in picked], GRID_SIDE, GRID_BOX, max_scale=4, lossless=True, root=run.path)
    what = (
        "one row per class, drawn from fixed noise"
        if objective == "diffusion"
        else "each row: an input | the model's output"
    )
    figures = []
    for (step, _), s in zip(picked, shown):
        if not s.src:
            figures.append(note(f"step {step:,}: {s.missing}", warn=True))
            continue
        rows: list[str] = []
        row_h = pad = 0.0
        source = thumbs.source_size(s)
        if source and size:
            tile = tile_size(size)  # pieces were enlarged in the grid (grids.py)
            n_rows = (source[1] - PAD) // (tile + PAD)
            scale = s.height / source[1]
            row_h, pad = (tile + PAD) * scale, PAD * scale
            rows = classes if objective == "diffusion" and len(classes) == n_rows else []
        figures.append(grid_figure(s, f"step {step:,}", rows, row_h, pad))
    head = note(f"{len(picked)} of {len(run.samples)} grids (the first, the last and an even spread); {what}")
    return card("Sample grids", head + f'<div class="grids">{"".join(figures)}</div>', "samples")


def _checkpoints_card(run: Any) -> str:
    rows = [
        [
            f"{step:,}",
            p.name,
            fmt(st.get("world_size")),
            fmt(st.get("global_batch")),
            "yes" if (p / "ema.safetensors").is_file() else "no",
        ]
        for step, p, st in run.checkpoints
    ]
    if run.final:
        final = run.path / "final"
        rows.append(
            [
                f"{run.final.get('step', 0):,}",
                "final/",
                "",
                "",
                "yes" if (final / "ema.safetensors").is_file() else "no",
            ]
        )
    if not rows:
        return card("Checkpoints", note("no complete checkpoint yet"), "checkpoints")
    return card(
        "Checkpoints", html_table(["step", "folder", "processes", "global batch", "EMA"], rows, [True]), "checkpoints"
    )


def train_seconds(metrics: list[dict], global_batch: int) -> float:
    """Training time from the logged img/s: each log window's steps x global batch / its img/s
    (validation, sample grids and checkpoints are not in it)."""
    total, prev = 0.0, 0
    for m in metrics:
        step, rate = m.get("step"), m.get("img_per_s")
        if isinstance(step, int) and isinstance(rate, int | float) and rate > 0 and "loss" in m:
            total += max(step - prev, 0) * global_batch / rate
            prev = step
    return total


def run_section(path: Path, thumbs: Thumbs) -> tuple[str, str]:
    """(title, HTML) of a run dir."""
    from artscale.contracts.run_dir import describe_denoiser, read_run_dir

    run = read_run_dir(path)
    config = run.config or {}
    objective = config.get("objective", "reconstruct")
    state = run.final or (run.checkpoints[-1][2] if run.checkpoints else {})
    newest = run.checkpoints[-1][2] if run.checkpoints else {}
    global_batch = int(
        newest.get("global_batch")
        or state.get("global_batch")
        or config.get("batch_size", 0) * config.get("grad_accum", 1)
    )
    train = [m for m in run.metrics if "loss" in m and isinstance(m.get("step"), int)]
    rates = [m["img_per_s"] for m in train if isinstance(m.get("img_per_s"), int | float) and m["img_per_s"] > 0]
    last = train[-1] if train else {}
    total = newest.get("total_steps") or config.get("max_steps") or None
    seconds = train_seconds(run.metrics, global_batch) if global_batch else 0.0
    summary = [
        ("objective", objective),
        ("last logged step", f"{last.get('step', 0):,}" + (f" of {total:,}" if total else "")),
        ("last loss", last.get("loss")),
        ("final weights", f"step {run.final.get('step'):,}" if run.final else "none yet"),
        ("training time (from img/s)", fmt_seconds(seconds) if seconds else "-"),
        ("img/s (median)", statistics.median(rates) if rates else None),
        ("global batch", global_batch or None),
    ]
    body = kpis(summary)
    for line in describe_denoiser(run.denoiser, config):  # what it samples with; a student's teacher
        body += note(line.strip())
    if run.unreadable_metrics:
        n = run.unreadable_metrics
        body += note(f"metrics.jsonl: {n} unreadable line{'s' * (n > 1)} skipped (a torn or corrupt line)", warn=True)
    body += note(
        "training time adds up each log window's steps x global batch / its img/s: validation, sample grids "
        "and checkpoints are not in it"
    )
    data_card, manifest_classes = _data_card(config)
    classes = list((run.denoiser or {}).get("classes") or manifest_classes)
    parts = [
        card("Summary", body, "summary"),
        card("Metrics against the step", _plots(run.metrics, classes), "metrics"),
        _grids_card(run, thumbs, classes, int(config.get("image_size", 0) or 0), objective),
        _config_card(run.config),
        data_card,
        _checkpoints_card(run),
        eval_card(sorted(path.glob("eval*.json"))),
    ]
    return f"run dir: {path.name} ({objective})", "".join(parts)

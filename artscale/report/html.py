"""This module draws the HTML and SVG of `artscale report`, as pure functions; no file is read here.

One self-contained page: inline CSS, inline SVG plots, no script, font or file from elsewhere."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

GENERATOR = "artscale report"  # the page's <meta name="generator">: marks a folder `report` may overwrite
COLOURS = ("#1f6fb4", "#d9731a", "#2b9a47", "#c8322f", "#7d5bb0", "#8a5a44", "#d256a8", "#6f6f6f", "#a5a61f", "#1aa6b8")

CSS = """
:root { --fg: #1d232b; --muted: #5d6671; --line: #d8dde3; --card: #fff; --bg: #f3f5f7; --accent: #1f6fb4; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); }
header.top { background: #1d232b; color: #eef2f6; padding: 14px 24px; }
header.top h1 { margin: 0; font-size: 20px; font-weight: 600; }
header.top p { margin: 2px 0 0; color: #aab4bf; font-size: 12.5px; }
nav.toc { padding: 8px 24px; background: #fff; border-bottom: 1px solid var(--line); font-size: 13px; }
nav.toc a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 8px 24px 40px; max-width: 1400px; }
section.source { margin-top: 18px; }
section.source > h2 { font-size: 18px; margin: 18px 0 4px; }
section.source > p.path { margin: 0 0 8px; color: var(--muted); font-family: ui-monospace, monospace; font-size: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px;
        margin: 12px 0; }
.card > h3 { margin: 0 0 8px; font-size: 15px; }
.note { color: var(--muted); font-size: 12.5px; margin: 4px 0; }
.warn { color: #9a3412; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; border-bottom: 1px solid #eef0f3; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.changed { font-weight: 600; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.kpis { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 8px; }
.kpi { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 120px; background: #fafbfc; }
.kpi b { display: block; font-size: 17px; }
.kpi span { color: var(--muted); font-size: 12px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure.plot { margin: 0; border: 1px solid #eef0f3; border-radius: 4px; padding: 4px; }
figure.plot figcaption { font-size: 11.5px; color: var(--muted); max-width: 380px; }
.swatch { display: inline-block; width: 10px; height: 3px; vertical-align: middle; margin: 0 3px 0 8px; }
svg.plot text { font: 10.5px system-ui, sans-serif; fill: #3b434c; }
svg.plot .title { font-size: 12px; font-weight: 600; fill: #1d232b; }
.grids { display: flex; flex-wrap: wrap; gap: 14px 22px; align-items: flex-start; }
figure.grid { margin: 0; }
figure.grid figcaption { font-size: 12.5px; color: var(--muted); margin-bottom: 3px; }
.gridrow { display: flex; align-items: flex-start; gap: 6px; }
.rowlabels { display: grid; font-size: 11.5px; color: var(--muted); text-align: right; }
.rowlabels div { display: flex; align-items: center; justify-content: flex-end; }
img { display: block; }
img.pixelated { image-rendering: pixelated; }
details.page { margin: 6px 0; }
details.page > summary { cursor: pointer; color: var(--accent); font-size: 13px; padding: 4px 0; }
.folders { display: flex; flex-wrap: wrap; gap: 4px 18px; align-items: flex-start; }
div.folder { min-width: 0; }
h4.folder { margin: 10px 0 4px; font-size: 13px; font-family: ui-monospace, monospace; color: #38414b; }
.sheet { display: flex; flex-wrap: wrap; gap: 8px; }
.tile { background: #fafbfc; border: 1px solid #e6e9ed; border-radius: 4px; padding: 4px; }
.tile .pair { display: flex; gap: 3px; }
.tile .cap { font-size: 10.5px; color: var(--muted); max-width: 260px; overflow-wrap: anywhere; margin-top: 2px; }
.tile .missing { display: flex; align-items: center; justify-content: center; background: #f1f2f4;
                 color: #9a3412; font-size: 11px; text-align: center; }
"""


def esc(value: Any) -> str:
    """HTML text of any value; a file name's undecodable bytes (held as surrogates) become U+FFFD."""
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(text, quote=True)


def fmt(value: Any) -> str:
    """A number for people: integers with separators, floats with 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e12 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s} s"


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] = ()) -> str:
    """A table of already formatted cells (escaped here); `numeric` right-aligns columns."""
    num = list(numeric) + [False] * (len(head) - len(numeric))
    th = "".join(f'<th class="num">{esc(h)}</th>' if n else f"<th>{esc(h)}</th>" for h, n in zip(head, num))
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if n else f"<td>{esc(c)}</td>"
            for c, n in zip(row, num + [False] * len(row))
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(items: Iterable[tuple[str, Any]], changed: set[str] = frozenset()) -> str:
    rows = []
    for key, value in items:
        cls = ' class="changed"' if key in changed else ""
        rows.append(f"<tr><th>{esc(key)}</th><td{cls}>{esc(fmt(value))}</td></tr>")
    return f"<table><tbody>{''.join(rows)}</tbody></table>"


def kpis(items: Iterable[tuple[str, Any]]) -> str:
    return (
        '<div class="kpis">'
        + "".join(f'<div class="kpi"><b>{esc(fmt(v))}</b><span>{esc(k)}</span></div>' for k, v in items)
        + "</div>"
    )


def card(title: str, body: str, anchor: str = "") -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f'<div class="card"{ident}><h3>{esc(title)}</h3>{body}</div>'


def note(text: str, warn: bool = False) -> str:
    return f'<p class="note{" warn" * warn}">{esc(text)}</p>'


# ---- line plots ----------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 and float(v).is_integer():
        return f"{v / 1000:g}k" if a < 1e6 else f"{v:.0e}".replace("e+0", "e").replace("e+", "e")
    if a >= 1e-3:
        return f"{v:.4g}"
    return f"{v:.0e}".replace("e-0", "e-")


def wants_log(values: Sequence[float]) -> bool:
    """Log scale when every value is positive and they span a factor of 20 or more (a loss, an lr decay)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 20


def _thin(points: list[tuple[float, float]], x0: float, x1: float, buckets: int) -> list[tuple[float, float]]:
    """At most ~4 points per pixel column (first, min, max, last), so a long run's plot stays small."""
    if len(points) <= 4 * buckets:
        return points
    width = (x1 - x0) / buckets or 1.0
    groups: dict[int, list[tuple[float, float]]] = {}
    for p in points:
        groups.setdefault(min(int((p[0] - x0) / width), buckets - 1), []).append(p)
    kept: list[tuple[float, float]] = []
    for _, group in sorted(groups.items()):
        picks = {0, len(group) - 1, min(range(len(group)), key=lambda i: group[i][1])}
        picks.add(max(range(len(group)), key=lambda i: group[i][1]))
        kept += [group[i] for i in sorted(picks)]
    return kept


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]] = field(default_factory=list)


def line_plot(series: Sequence[Series], title: str, ylabel: str, xlabel: str = "step", log: bool | None = None) -> str:
    """An inline SVG line plot with labelled axes; `log` None decides by `wants_log`."""
    width, height, left, right, top, bottom = 380, 230, 58, 12, 22, 38
    pw, ph = width - left - right, height - top - bottom
    points = [(x, y) for s in series for x, y in s.points]
    ys = [y for _, y in points]
    log = wants_log(ys) if log is None else log and bool(ys) and min(ys) > 0
    xs = [x for x, _ in points]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if log:
        y0, y1 = math.log10(min(ys)), math.log10(max(ys))
        pad = max((y1 - y0) * 0.05, 0.05)
        y0, y1 = y0 - pad, y1 + pad
    else:
        y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        pad = (y1 - y0) * 0.06 or max(abs(y0) * 0.1, 1e-9)
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        v = math.log10(y) if log else y
        return top + ph - (v - y0) / (y1 - y0) * ph

    parts = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
        f"<title>{esc(title)}</title>",
        f'<text class="title" x="{left}" y="14">{esc(title)}{" (log scale)" if log else ""}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fcfdfe" stroke="#c9d0d8"/>',
    ]
    if log:
        lo, hi = math.floor(y0), math.ceil(y1)
        mults = (1,) if hi - lo > 2 else (1, 2, 5)
        yticks = [m * 10.0**e for e in range(lo, hi + 1) for m in mults if y0 <= math.log10(m * 10.0**e) <= y1]
        if len(yticks) < 3:  # less than a decade: evenly spaced values read better
            yticks = [t for t in _nice_ticks(10**y0, 10**y1) if t > 0 and y0 <= math.log10(t) <= y1]
    else:
        yticks = [t for t in _nice_ticks(y0, y1) if y0 <= t <= y1]
    for t in yticks:
        y = sy(t)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6eaee"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end">{esc(_tick_label(t))}</text>')
    for t in [t for t in _nice_ticks(x0, x1) if x0 <= t <= x1]:
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#eef1f4"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 13}" text-anchor="middle">{esc(_tick_label(t))}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(
        f'<text transform="translate(12 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">{esc(ylabel)}</text>'
    )
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = _thin(sorted(s.points), x0, x1, pw)
        if len(pts) == 1:
            ((x, y),) = pts
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
        elif pts:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.4" points="{coords}"/>')
    parts.append("</svg>")
    legend = ""
    if len(series) > 1:
        legend = (
            "<figcaption>"
            + "".join(
                f'<span class="swatch" style="background:{COLOURS[i % len(COLOURS)]}"></span>{esc(s.name)}'
                for i, s in enumerate(series)
            )
            + "</figcaption>"
        )
    return f'<figure class="plot">{"".join(parts)}{legend}</figure>'


# ---- images -------------------------------------------------------------------------------------


@dataclass
class Shown:
    """One image on the page: its thumbnail file (relative to index.html) and the size it is drawn at,
    or why there is none."""

    src: str = ""
    width: int = 0
    height: int = 0
    pixelated: bool = False
    missing: str = ""
    alt: str = ""


def img(shown: Shown, box: int, lazy: bool = True) -> str:
    if not shown.src:
        return f'<div class="missing" style="width:{box}px;height:{box}px">{esc(shown.missing)}</div>'
    cls = ' class="pixelated"' if shown.pixelated else ""
    load = ' loading="lazy"' if lazy else ""
    return (
        f'<img src="{esc(shown.src)}" width="{shown.width}" height="{shown.height}" alt="{esc(shown.alt)}"'
        f'{cls}{load} decoding="async">'
    )


@dataclass
class Tile:
    folder: str
    caption: str
    images: list[Shown]


def contact_sheet(tiles: Sequence[Tile], box: int, page_size: int, what: str) -> str:
    """Tiles grouped by folder, in pages of `page_size`; the first page open, the others closed (their
    lazy images load only when a page is opened)."""
    if not tiles:
        return note(f"no {what} to show")
    pages = [tiles[i : i + page_size] for i in range(0, len(tiles), page_size)]
    out = []
    for n, page in enumerate(pages, 1):
        first, last = (n - 1) * page_size + 1, (n - 1) * page_size + len(page)
        folders = [page[0].folder, page[-1].folder]
        span = folders[0] if folders[0] == folders[1] else f"{folders[0]} .. {folders[1]}"
        body, folder = [], None
        for tile in page:
            if tile.folder != folder:
                if folder is not None:
                    body.append("</div></div>")
                folder = tile.folder
                body.append(
                    f'<div class="folder"><h4 class="folder">{esc(folder or "(top folder)")}</h4><div class="sheet">'
                )
            pics = "".join(img(s, box) for s in tile.images)
            body.append(
                f'<div class="tile" title="{esc(tile.caption)}"><div class="pair">{pics}</div>'
                f'<div class="cap">{esc(tile.caption)}</div></div>'
            )
        body.append("</div></div>")
        label = f"page {n} of {len(pages)}: {what} {first:,}-{last:,} ({span or '(top folder)'})"
        out.append(
            f'<details class="page"{" open" * (n == 1)}><summary>{esc(label)}</summary>'
            f'<div class="folders">{"".join(body)}</div></details>'
        )
    return "".join(out)


def grid_figure(shown: Shown, caption: str, rows: Sequence[str] = (), row_height: float = 0, pad: float = 0) -> str:
    """A sample grid, with a label beside each row when `rows` names them."""
    labels = ""
    if rows and row_height:
        cells = "".join(f'<div style="height:{row_height:.2f}px">{esc(r)}</div>' for r in rows)
        labels = f'<div class="rowlabels" style="padding-top:{pad:.2f}px">{cells}</div>'
    return (
        f'<figure class="grid"><figcaption>{esc(caption)}</figcaption>'
        f'<div class="gridrow">{labels}{img(shown, 0)}</div></figure>'
    )


def page(title: str, subtitle: str, toc: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    nav = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in toc)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{GENERATOR}">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header class="top"><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>'
        f'<nav class="toc">{nav}</nav><main>{"".join(sections)}</main></body></html>\n'
    )

"""This module is `artscale demo`: the whole pipeline on a procedural art collection it draws itself.

Pack -> train -> export -> generate, and a diffusion model trained on the same collection that draws
new pieces of each class from noise.

The collection is drawn here (no download): the article's five Kaggle classes, about 200 images
of mixed sizes, formats and colour modes, and a few broken files so the skip path shows.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from artscale.core.atomic import write_atomic

CLASSES = ("drawings", "engraving", "iconography", "painting", "sculpture")
PAPER = (236, 228, 208)
DIFFUSION_PRESET = "diffusion-cpu"  # the demo's diffusion recipe is this preset's, as shipped


def _drawing(rnd: random.Random, w: int, h: int) -> Image.Image:
    im = Image.new("L", (w, h), 240)
    d = ImageDraw.Draw(im)
    x, y = rnd.uniform(0, w), rnd.uniform(0, h)
    for _ in range(rnd.randint(20, 60)):
        nx, ny = min(max(x + rnd.gauss(0, w / 6), 0), w), min(max(y + rnd.gauss(0, h / 6), 0), h)
        d.line((x, y, nx, ny), fill=rnd.randint(10, 90), width=rnd.randint(1, 3))
        x, y = nx, ny
    return im


def _engraving(rnd: random.Random, w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), PAPER)
    d = ImageDraw.Draw(im)
    cx, cy, r = w * rnd.uniform(0.3, 0.7), h * rnd.uniform(0.3, 0.7), min(w, h) * rnd.uniform(0.2, 0.45)
    step = rnd.randint(3, 6)
    for i in range(-h, w + h, step):
        for j in range(0, h, 2):
            x = i + j * 0.6
            if math.hypot(x - cx, j - cy) < r or (j > h * 0.75 and (i // step) % 2):
                d.point((x, j), fill=(30, 25, 20))
    return im


def _iconography(rnd: random.Random, w: int, h: int) -> Image.Image:
    gold = (rnd.randint(180, 215), rnd.randint(140, 170), rnd.randint(40, 70))
    im = Image.new("RGB", (w, h), gold)
    d = ImageDraw.Draw(im)
    m = min(w, h) // 12
    d.rectangle((m, m, w - m, h - m), outline=(90, 20, 20), width=max(m // 2, 2))
    cx = w / 2
    d.ellipse((cx - w * 0.18, h * 0.12, cx + w * 0.18, h * 0.42), fill=(240, 200, 90))  # halo
    d.ellipse((cx - w * 0.1, h * 0.18, cx + w * 0.1, h * 0.38), fill=(200, 150, 110))  # face
    robe = (rnd.randint(20, 60), rnd.randint(20, 60), rnd.randint(90, 160))
    d.polygon([(cx, h * 0.36), (cx - w * 0.3, h * 0.9), (cx + w * 0.3, h * 0.9)], fill=robe)
    return im


def _painting(rnd: random.Random, w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    c1, c2 = np.array([rnd.randint(0, 255) for _ in range(3)]), np.array([rnd.randint(0, 255) for _ in range(3)])
    t = (np.sin(xx * rnd.uniform(2, 8)) + np.cos(yy * rnd.uniform(2, 8)) + 2) / 4
    im = Image.fromarray((c1 * t[..., None] + c2 * (1 - t[..., None])).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(rnd.randint(8, 25)):
        x, y, r = rnd.uniform(0, w), rnd.uniform(0, h), rnd.uniform(3, min(w, h) / 5)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rnd.randint(0, 255) for _ in range(3)))
    return im.filter(ImageFilter.GaussianBlur(rnd.uniform(0.5, 2.5)))


def _sculpture(rnd: random.Random, w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full((h, w), 25.0)
    for _ in range(rnd.randint(1, 3)):
        cx, cy, r = rnd.uniform(0.25, 0.75) * w, rnd.uniform(0.25, 0.75) * h, rnd.uniform(0.15, 0.35) * min(w, h)
        dist2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
        inside = dist2 < 1
        shade = np.sqrt(np.clip(1 - dist2, 0, 1)) * 0.7 + np.clip((cx - xx - (cy - yy)) / (3 * r), -0.3, 0.3)
        img[inside] = np.clip(60 + 190 * shade[inside], 0, 255)
    tint = np.array([1.0, 0.97, 0.9])
    return Image.fromarray(np.clip(img[..., None] * tint, 0, 255).astype(np.uint8), "RGB")


DRAWERS = {
    "drawings": _drawing,
    "engraving": _engraving,
    "iconography": _iconography,
    "painting": _painting,
    "sculpture": _sculpture,
}


def _save(im: Image.Image, path: Path, rnd: random.Random, root: Path) -> None:
    if path.suffix == ".png" and rnd.random() < 0.3:
        im = im.convert("RGBA")  # colour modes vary in real collections
    if path.suffix in (".jpg", ".webp") and im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".webp": "WEBP"}.get(path.suffix, "PNG")
    im.save(buf, fmt, quality=90) if fmt != "PNG" else im.save(buf, fmt)
    write_atomic(path, buf.getvalue(), root=root)


def make_collection(root: Path, per_class: int = 40, held_out: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """Write `root/collection/<class>/...` (plus broken files) and `root/held-out/...` for generation."""
    rnd = random.Random(seed)
    collection, held = root / "collection", root / "held-out"
    for cls in CLASSES:
        for i in range(per_class):
            w, h = rnd.randint(96, 400), rnd.randint(96, 400)
            ext = rnd.choice([".jpg", ".jpg", ".png", ".webp"])
            _save(DRAWERS[cls](rnd, w, h), collection / cls / f"{cls}_{i:03d}{ext}", rnd, root)
    # The broken files every real collection has (the article's Kaggle set ships some).
    good = io.BytesIO()
    _painting(rnd, 200, 200).save(good, "JPEG")
    write_atomic(collection / "painting" / "truncated_scan.jpg", good.getvalue()[: len(good.getvalue()) // 3])
    write_atomic(collection / "sculpture" / "not_an_image.png", "<html>404 Not Found</html>")
    write_atomic(collection / "drawings" / "empty.jpg", b"")
    write_atomic(collection / "engraving" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    for i in range(held_out):
        cls = CLASSES[i % len(CLASSES)]
        w, h = rnd.randint(96, 400), rnd.randint(96, 400)
        _save(DRAWERS[cls](rnd, w, h), held / cls / ("nested" if i % 2 else "") / f"input {i:02d}.jpg", rnd, root)
    write_atomic(held / "README.txt", "held-out inputs for artscale generate\n")
    return collection, held


def _before_after(held: Path, generated: Path, report: dict, size: int, path: Path, count: int = 10) -> Path | None:
    """A grid of held-out inputs (top) and what the model made of them (bottom)."""

    from artscale.data.grids import grid_image
    from artscale.data.images import encode_image, load_image

    by_class: dict[str, list[Path]] = {}
    for out in sorted(generated.rglob("*.png")):
        by_class.setdefault(out.relative_to(generated).parts[0], []).append(out)
    picked = [p for column in zip(*by_class.values()) for p in column][:count]  # one of each class in turn
    pairs = []
    for out in picked:
        rel = out.relative_to(generated).with_suffix(".jpg")
        if (held / rel).is_file():
            before, _ = load_image(held / rel, (size, size))
            after, _ = load_image(out, (size, size))
            pairs.append((before, after))
    if not pairs:
        return None
    tiles = np.stack([np.asarray(b) for b, _ in pairs] + [np.asarray(a) for _, a in pairs])
    grid = grid_image(tiles, len(pairs))  # small pieces enlarged (grids.py): judged by eye
    write_atomic(path, encode_image(grid, "png"))
    return path


def _diffusion(out: Path, collection: Path, steps: int, every: int) -> Path:
    """Train the diffusion-cpu preset at 32 px (its recipe as shipped, for `steps` optimizer steps); returns
    its last grid of new pieces."""
    from artscale.data.pack import pack
    from artscale.train.config import load_config
    from artscale.train.loop import EXIT_PREEMPTED, train

    pack(collection, out / "shards-32", size=32, val_fraction=0.1, shard_max_count=16)
    run_dir = out / "diffusion"
    places = [f"data={out / 'shards-32'}", f"run_dir={run_dir}", f"max_steps={steps}", f"log_every={every}"]
    policies = ["sample_every=100", "val_every=100", "checkpoint_every=100"]  # more grids for the report
    cfg = load_config(DIFFUSION_PRESET, [*places, *policies])
    if train(cfg) == EXIT_PREEMPTED:
        raise SystemExit(EXIT_PREEMPTED)
    grid = out / "new-pieces.png"
    write_atomic(grid, (run_dir / "samples" / f"step-{steps:06d}.png").read_bytes())  # the last grid: EMA, fixed seeds
    return grid


def run_demo(out: Path, steps: int = 0, size: int = 64) -> dict:
    """The whole pipeline on a generated collection; rerunning continues where it stopped.
    `steps` (0: a few minutes on CPU each) sets both training runs: the article's and diffusion's."""
    from artscale.data.pack import pack
    from artscale.export.article import export_onnx
    from artscale.infer.generate import generate
    from artscale.report.build import write_report
    from artscale.train.config import load_config
    from artscale.train.loop import EXIT_PREEMPTED, train
    from artscale.train.losses import RANDOM_VGG_WARNING

    out = Path(out)
    started = time.perf_counter()
    print(f"artscale demo in {out}/\nNOTE: {RANDOM_VGG_WARNING}: pretrained VGG16 weights need a download.\n")
    marker = out / "collection.done"
    if not marker.exists():
        make_collection(out)
        write_atomic(marker, "made by artscale demo\n")
    collection, held = out / "collection", out / "held-out"

    took: dict[str, float] = {}
    t = time.perf_counter()
    print("== 1/5 pack")
    manifest = pack(collection, out / "shards", size=size, val_fraction=0.1, shard_max_count=16)
    took["pack"], t = time.perf_counter() - t, time.perf_counter()
    print("\n== 2/5 train (the article's objective: reconstruct)")
    run_dir = out / "run"
    diffusion_steps = steps or load_config(DIFFUSION_PRESET).max_steps
    steps = steps or 300
    every = max(1, min(10, steps // 5))  # a few loss lines even for a short run
    cfg = load_config(
        None,
        [
            f"data={out / 'shards'}",
            f"run_dir={run_dir}",
            f"image_size={size}",
            "batch_size=16",
            f"max_steps={steps}",
            "vgg_weights=random",
            "mixed_precision=auto",
            "tracker=tensorboard",
            f"log_every={every}",
            "sample_every=50",
            "val_every=50",
            "checkpoint_every=50",
            "num_workers=0",
            "lr_step_epochs=30",
        ],
    )
    code = train(cfg)
    if code == EXIT_PREEMPTED:
        raise SystemExit(code)
    took["train"], t = time.perf_counter() - t, time.perf_counter()
    print("\n== 3/5 export")
    onnx_path = out / "exports" / "demo.onnx"
    exported = export_onnx(run_dir, onnx_path)
    took["export"], t = time.perf_counter() - t, time.perf_counter()
    print("\n== 4/5 generate")
    generated = out / "generated"
    report = generate(onnx_path, held, generated)
    grid = _before_after(held, generated, report, size, out / "before-after.png")
    took["generate"], t = time.perf_counter() - t, time.perf_counter()
    print("\n== 5/5 diffusion: a class-conditional denoiser at 32 px, then new pieces drawn from noise")
    pieces = _diffusion(out, collection, diffusion_steps, max(1, min(50, diffusion_steps // 5)))
    took["diffusion"], t = time.perf_counter() - t, time.perf_counter()
    print("\n== report: the runs and the generated images as one page")
    index = write_report([run_dir, generated, out / "diffusion"], out / "report")
    took["report"] = time.perf_counter() - t

    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    summary = {
        "packed": manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"],
        "skipped": len(manifest["skipped"]),
        "loss_first": losses[0]["loss"] if losses else None,
        "loss_last": losses[-1]["loss"] if losses else None,
        "parity_max_uint8_diff": exported["parity"]["max_uint8_diff"],
        "generated": report["written"] + report["already_done"],
        "img_per_s": report["img_per_s"],
        "seconds": {k: round(v, 1) for k, v in took.items()},
    }
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
    print(f"""
== artscale demo: done in {time.perf_counter() - started:.0f} s (VGG16 weights: random, see the note above)
  collection  {collection}  ({summary["packed"]} packed, {summary["skipped"]} skipped: {", ".join(s["path"] for s in manifest["skipped"])})
  shards      {out / "shards"}  (artscale info {out / "shards"})
  training    {run_dir}  loss {summary["loss_first"]:.4f} -> {summary["loss_last"]:.4f} over {cfg.max_steps} steps; samples in {run_dir / "samples"}
  onnx        {onnx_path}  parity vs PyTorch: max float diff {exported["parity"]["max_float_diff"]:.2g}, max uint8 diff {summary["parity_max_uint8_diff"]}
  generated   {generated}  ({summary["generated"]} images, {report["skipped"]} skipped, {report["img_per_s"]} img/s on {report["provider"]})
  before/after {grid}
  new pieces  {pieces}  (diffusion, {diffusion_steps} steps: one row per class, drawn from noise; run in {out / "diffusion"})
  time        {timing}
""")
    print(f"report: {index}  (open it in a browser)")
    return summary

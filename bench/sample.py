"""Sampling speed: `artscale sample` (onnxruntime) against the same denoiser and scheduler in a plain
PyTorch loop written as diffusers' pipelines write it, and against the ceiling (onnxruntime alone on
the denoiser, steps x 2 rows per image: the better of one session on all cores and artscale's split of
the rows into single-threaded runs), all measured in this run on the same seeds.

    .venv/bin/python bench/sample.py                        # tiny preset at 32 px, ~1-2 minutes on 2 cores
    .venv/bin/python bench/sample.py --models tiny:32,small:128
    .venv/bin/python bench/sample.py --models small:128 --images 5 --rounds 1 --batch-size 5   # ~5 minutes

Random-init weights (speed does not depend on them). 20 steps of DPM-Solver++(2M), guidance 3.
The machine may be shared: CPU seconds per image (process time, all threads) are reported too.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _diffusion_helpers import make_diffusion_run  # noqa: E402

from artscale import usable_cores  # noqa: E402
from artscale.checkpoint import load_denoiser  # noqa: E402
from artscale.diffusion import make_sampler, noise_for, to_uint8  # noqa: E402
from artscale.export import export_onnx  # noqa: E402
from artscale.generate import open_session  # noqa: E402
from artscale.sample import onnx_predict, sample_images  # noqa: E402

CLASSES = ["a", "b", "c", "d", "e"]


def timed(fn, *args, **kw) -> tuple[float, float]:
    """(wall s, CPU s of this process) of fn(*args, **kw)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kw)
    return time.perf_counter() - wall, time.process_time() - cpu


def pytorch_loop(run: Path, out: Path, count: int, batch: int, steps: int, guidance: float, seed: int) -> None:
    """diffusers' pipeline loop (DDPMPipeline / DiT's): cat([latents] * 2), one UNet call, guidance, step."""
    unet, meta = load_denoiser(run)
    size, null = meta["image_size"], meta["null_label"]
    out.mkdir(parents=True)
    with torch.no_grad():
        for start in range(0, count, batch):
            keys = list(range(start, min(start + batch, count)))
            scheduler = make_sampler("dpm++", meta["scheduler"])
            scheduler.set_timesteps(steps)
            latents = noise_for(seed, keys, (3, size, size)) * scheduler.init_noise_sigma
            labels = torch.tensor([k % len(CLASSES) for k in keys])
            class_labels = torch.cat([labels, torch.full_like(labels, null)])
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                pred = unet(model_in, t, class_labels=class_labels).sample
                cond, uncond = pred.chunk(2)
                latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
            for k, pixels in zip(keys, to_uint8(latents)):
                Image.fromarray(pixels).save(out / f"{k:08d}.png")


def ceiling(onnx: Path, size: int, batch: int, steps: int, calls: int) -> tuple[float, float]:
    """(img/s, CPU s per image) of onnxruntime alone: `calls` runs of a 2 x batch input, `steps` per image;
    the better of one session on all cores and artscale's split of the rows (a single-threaded run per core)."""
    cores, best = usable_cores(), (0.0, math.inf)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2 * batch, 3, size, size), dtype=np.float32))
    t, labels = torch.full((2 * batch,), 500, dtype=torch.int64), torch.arange(2 * batch) % len(CLASSES)
    for threads, streams in ((cores, 1), (1, cores)):
        session, _ = open_session(onnx, "cpu", False, "default", threads=threads)
        predict = onnx_predict(session, streams)
        predict(x, t, labels)
        wall, spent = timed(lambda p=predict: [p(x, t, labels) for _ in range(calls)])
        images = batch * calls / steps
        if images / wall > best[0]:
            best = (images / wall, spent / images)
    return best


def bench(root: Path, preset: str, size: int, count: int, batch: int, steps: int, guidance: float, rounds: int) -> dict:
    """Each round measures all three in turn; the best round of each counts (the machine may be shared)."""
    run = make_diffusion_run(root / f"run-{preset}", size=size, preset=preset, classes=CLASSES)
    onnx = root / f"{preset}.onnx"
    export_onnx(run, onnx)
    kw = dict(count=count // len(CLASSES), steps=steps, guidance=guidance, seed=0, batch_size=batch, device="cpu")
    best: dict[str, list[float]] = {"sample": [], "pytorch": [], "ceiling": []}
    cpu: dict[str, list[float]] = {"sample": [], "pytorch": [], "ceiling": []}
    for r in range(rounds):
        out = root / f"ort-{preset}-{r}"
        wall, spent = timed(sample_images, onnx, out, **kw)
        report = json.loads((out / "report.json").read_text())
        n = report["written"]
        best["sample"].append(report["img_per_s"])
        cpu["sample"].append(spent / n)
        wall, spent = timed(pytorch_loop, run, root / f"pt-{preset}-{r}", n, batch, steps, guidance, 0)
        best["pytorch"].append(n / wall)
        cpu["pytorch"].append(spent / n)
        ips, spent = ceiling(onnx, size, batch, steps, calls=min(steps * n // batch, 10))
        best["ceiling"].append(ips)
        cpu["ceiling"].append(spent)
    ips = {k: max(v) for k, v in best.items()}
    cpu_s = {k: min(v) for k, v in cpu.items()}
    return {
        "preset": preset,
        "size": size,
        "images": n,
        "batch_size": batch,
        "rounds": rounds,
        "sample_img_per_s": ips["sample"],
        "pytorch_loop_img_per_s": ips["pytorch"],
        "ceiling_img_per_s": ips["ceiling"],
        "speedup_vs_pytorch": ips["sample"] / ips["pytorch"],
        "fraction_of_ceiling": ips["sample"] / ips["ceiling"],
        "cpu_s_per_img": cpu_s,
        "speedup_vs_pytorch_cpu_time": cpu_s["pytorch"] / cpu_s["sample"],
        "fraction_of_ceiling_cpu_time": cpu_s["ceiling"] / cpu_s["sample"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny:32", help="preset:size,... (default tiny:32)")
    parser.add_argument("--images", type=int, default=40, help="images per model and round (5 classes)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models.split(","):
            preset, size = spec.split(":")
            results.append(
                bench(
                    Path(tmp), preset, int(size), args.images, args.batch_size, args.steps, args.guidance, args.rounds
                )
            )
    out = {
        "cores": usable_cores(),
        "threads_torch": torch.get_num_threads(),
        "sampler": "dpm++",
        "steps": args.steps,
        "guidance": args.guidance,
        "results": results,
    }
    print(json.dumps(out, default=lambda v: round(v, 3)))


if __name__ == "__main__":
    main()

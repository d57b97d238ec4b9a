"""Benchmark: training images/s of artscale's loop against the article's loop, same model, loss and batch,
both on the same device (a GPU when there is one, else the CPU; `--device` picks).

The article's loop is written plainly here: fp32, contiguous tensors, model + VGG16 features[:16]
hybrid loss + Adam, on a batch already on the device. artscale's figure is the real thing:
`artscale train` on shards packed from the same kind of images, read from its metrics.jsonl
(log_every=1: each logged step ends with a host sync, so its time is the step's), with the
step's data wait (decoding) taken out, with mixed_precision=no and =bf16 (bf16 on a CPU only
where it has avx512_bf16 or AMX). Both sides warm up for `--warmup` steps outside the timing
and synchronise the device before reading clocks. Each figure is the batch over the median step
time; the baselines run before and after artscale's runs, their steps pooled (a shared machine's
speed drifts by tens of percent within a minute). VGG weights are random in both (same compute;
no download). Prints one JSON line with the device it ran on.
The diffusion step (--diffusion-size, 0 skips it): `artscale train objective=diffusion` (the tiny
UNet, v-prediction, cosine schedule, EMA, grad clipping) against a plain loop written as diffusers'
examples/unconditional_image_generation/train_unconditional.py does it: same UNet, scheduler,
batch, clipping and EMA, fp32, `add_noise` + `get_velocity`, the batch already on the device.
Run: .venv/bin/python bench/train_step.py [--steps 3] [--batch-size 32] [--size 128] [--device cuda]

--variants (bench/gpu_check.sh's training section) measures `artscale train` itself, in this process,
one JSON line per variant and batch source: NAME:BATCH[:cl|:nocl], NAME `article` (the article's
model and VGG loss) or a denoiser preset (objective=diffusion), cl/nocl: channels_last on/off.
Each line has img/s (batch over the median step time after --warmup steps, from metrics.jsonl with
log_every=1), the mean data wait per step, the peak CUDA memory, the FLOPs of one training step per
image (torch.utils.flop_counter.FlopCounterMode over a warm-up step: the matmuls and convolutions of
forward and backward, the loss network included) and the TFLOP/s that makes, as a share of the
device's dense bf16 peak where PEAK_BF16_TFLOPS knows the device. `--sources loader,device`: batches
from the shards through the real loader, and the same loop fed batches made once on the device (no
decoding, no copy), which separates the loader from the step.
    .venv/bin/python bench/train_step.py --variants article:32,small:64:nocl --shards SHARDS --work DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from artscale.core.hardware import cpu_native_bf16  # noqa: E402
from artscale.models.article import ConvDiffusionModel, normalize  # noqa: E402
from artscale.train.losses import load_vgg_features  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], steps: int, device: torch.device, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones, the device synchronised
    around each (as artscale's log_every=1 steps are)."""
    seconds = []
    for i in range(warmup + steps):
        synchronize(device)
        t = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - t)
    return seconds


def article_loop(steps: int, batch: int, size: int, device: torch.device, warmup: int) -> list[float]:
    """Seconds per step of the article's step on `device`."""
    torch.manual_seed(0)
    model, vgg = ConvDiffusionModel().to(device), load_vgg_features("random").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(batch, 3, size, size, device=device)
    x, target = normalize(images), images

    def step() -> None:
        out = model(x)
        loss = F.mse_loss(out, target) + F.mse_loss(vgg(normalize(out)), vgg(normalize(target)))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, steps, device, warmup)


def diffusers_loop(steps: int, batch: int, size: int, device: torch.device, warmup: int) -> list[float]:
    """Seconds per step of a diffusion step as diffusers' train_unconditional.py writes it."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from artscale.models.denoiser import DENOISER_PRESETS, build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(size, 2, *DENOISER_PRESETS["tiny"]).to(device)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    clean = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    labels = torch.randint(0, 2, (batch,), device=device)

    def step() -> None:
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()
        noisy = scheduler.add_noise(clean, noise, timesteps)
        pred = model(noisy, timesteps, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), scheduler.get_velocity(clean, noise, timesteps).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.step(model.parameters())

    return timed(step, steps, device, warmup)


def make_shards(root: Path, n: int, size: int) -> Path:
    from artscale.data.pack import pack

    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / "src" / ("a", "b")[i % 2] / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
        small.resize((int(rng.integers(300, 800)), int(rng.integers(300, 800))), Image.Resampling.BICUBIC).save(
            path, quality=90
        )
    pack(root / "src", root / "shards", size=size, val_fraction=0.0, workers=1, shard_max_count=8)
    return root / "shards"


def artscale_loop(
    shards: Path,
    run_dir: Path,
    steps: int,
    batch: int,
    size: int,
    precision: str,
    device: torch.device,
    warmup: int,
    *extra: str,
) -> list[float]:
    """Seconds per `artscale train` step after `warmup`, from its metrics.jsonl, data wait taken out."""
    cmd = [
        str(Path(sys.executable).parent / "artscale"),
        "train",
        f"data={shards}",
        f"run_dir={run_dir}",
        f"image_size={size}",
        f"batch_size={batch}",
        f"max_steps={steps + warmup}",
        "vgg_weights=random",
        "tracker=none",
        "num_workers=0",
        "log_every=1",
        "val_every=100000",
        "sample_every=100000",
        "checkpoint_every=100000",
        f"mixed_precision={precision}",
        *extra,
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same device as the article's loop
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [batch / m["img_per_s"] - m["data_wait_s"] for m in logged if "loss" in m][warmup:]


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (they print twice these
# figures "with sparsity"): H100 SXM and H200 SXM 989, H100 NVL and H200 NVL 835, H100 PCIe 756,
# A100 312, L40S 362, L40 181, L4 121, A10 125. Matched against torch.cuda.get_device_name, first match wins.
PEAK_BF16_TFLOPS = (
    (r"H[12]00 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100|H200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_TFLOPS, or None for a device the table does not know."""
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


class Batches:
    """What `artscale train` reads in place of its loader: the real loader's batches, or one batch made
    on the device and given again each step; the step after batch `count_at` runs under FlopCounterMode."""

    def __init__(self, batches, count_at: int) -> None:
        self.batches, self.count_at, self.seen = iter(batches), count_at, 0
        self.mode, self.flops = None, 0

    def __iter__(self) -> Batches:
        return self

    def __next__(self):
        self.close()
        batch = next(self.batches)
        if self.seen == self.count_at:
            from torch.utils.flop_counter import FlopCounterMode

            self.mode = FlopCounterMode(display=False)
            self.mode.__enter__()
        self.seen += 1
        return batch

    def close(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.flops, self.mode = self.mode.get_total_flops(), None


def variant_overrides(spec: str) -> tuple[str, int, list[str]]:
    """NAME:BATCH[:cl|:nocl] -> (label, batch, config keys)."""
    name, batch, *layout = spec.split(":")
    keys = ["objective=reconstruct"] if name == "article" else ["objective=diffusion", f"denoiser={name}"]
    if layout:
        keys.append(f"channels_last={'true' if layout[0] == 'cl' else 'false'}")
    return f"{name}-b{batch}{'-' + layout[0] if layout else ''}", int(batch), keys


def measure_variant(
    spec: str, source: str, shards: Path, work: Path, size: int, steps: int, warmup: int, precision: str
) -> dict:
    """One in-process `artscale train` run of `spec` fed by `source` (loader | device): its JSON record."""
    from accelerate.state import AcceleratorState

    import artscale.train.loop as trainer
    from artscale.data.loader import data_spec
    from artscale.train.config import load_config
    from artscale.train.setup import precision_for

    label, batch, keys = variant_overrides(spec)
    run_dir = work / f"{label}-{source}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run there would resume with nothing left to do
    cfg = load_config(
        None,
        [
            f"data={shards}",
            f"run_dir={run_dir}",
            f"image_size={size}",
            f"batch_size={batch}",
            f"max_steps={warmup + steps}",
            f"mixed_precision={precision}",
            "vgg_weights=random",
            "tracker=none",
            "log_every=1",
            "val_every=1000000",
            "sample_every=1000000",
            "checkpoint_every=1000000",
            "val_batches=1",  # the last step validates and draws a sample grid: keep both short
            "sample_steps=2",
            *keys,
        ],
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = len(data_spec(str(shards), size).classes)
    made: list[Batches] = []
    real_loader = trainer.train_loader

    def loader(*args, **kwargs) -> Batches:
        if source == "loader":
            batches = real_loader(*args, **kwargs)
        else:
            g = torch.Generator(device).manual_seed(0)
            images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device, generator=g)
            labels = torch.randint(0, classes, (batch,), device=device, generator=g)
            batches = iter(lambda: (images, labels, [""] * batch, 0), None)
        made.append(Batches(batches, count_at=max(0, warmup - 1)))
        return made[-1]

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train_loader = loader
    try:
        code = trainer.train(cfg)
    finally:
        trainer.train_loader = real_loader
        for b in made:
            b.close()
        AcceleratorState._reset_state(True)
    if code != 0:
        raise SystemExit(f"{label} ({source}): artscale train exited {code}")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in logged if "loss" in m][warmup:]
    step_s = [batch / m["img_per_s"] for m in timed]
    wait_s = [m["data_wait_s"] for m in timed]
    img_s = batch / statistics.median(step_s)
    flops = made[0].flops / batch if made and made[0].flops else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    tflops = flops * img_s / 1e12 if flops else None
    return {
        "variant": label,
        "source": source,
        "batch_size": batch,
        "image_size": size,
        "steps": len(timed),
        "warmup": warmup,
        "precision": precision_for(cfg).mode,
        "channels_last": cfg.channels_last,
        "device": name,
        "img_s": round(img_s, 2),
        "img_s_without_data_wait": round(batch / statistics.median(s - w for s, w in zip(step_s, wait_s)), 2),
        "data_wait_s": round(statistics.fmean(wait_s), 5),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "gflop_per_img": round(flops / 1e9, 3) if flops else None,
        "tflop_s": float(f"{tflops:.4g}") if tflops else None,
        "peak_bf16_tflop_s": peak,
        "share_of_bf16_peak": round(tflops / peak, 4) if tflops and peak else None,
    }


def device_check(args: argparse.Namespace) -> None:
    """--variants: one JSON line per variant and source, on stdout and appended to --jsonl."""
    if not args.shards:
        raise SystemExit("--variants needs --shards (a shards dir at --size)")
    work = Path(args.work or tempfile.mkdtemp(prefix="train-step-"))
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "auto")
    for spec in args.variants.split(","):
        for source in args.sources.split(","):
            record = {
                "bench": "train_step",
                **measure_variant(spec, source, Path(args.shards), work, args.size, args.steps, args.warmup, precision),
            }
            line = json.dumps(record)
            print(line, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(line + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (cuDNN's kernel search, caches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument(
        "--images", type=int, default=160, help="images packed into the shards (an epoch is images / batch steps)"
    )
    p.add_argument("--diffusion-size", type=int, default=32, help="image size of the diffusion step; 0 skips it")
    p.add_argument("--variants", default="", help="NAME:BATCH[:cl|:nocl],...: artscale train alone (see above)")
    p.add_argument("--shards", default="", help="with --variants: the shards dir to train on (at --size)")
    p.add_argument("--work", default="", help="with --variants: where the run dirs go (default: a temporary dir)")
    p.add_argument("--sources", default="loader,device", help="with --variants: loader, device or both")
    p.add_argument("--precision", default="", help="with --variants: mixed_precision (default bf16 on CUDA, else auto)")
    p.add_argument("--jsonl", default="", help="with --variants: also append each line to this file")
    args = p.parse_args()
    if args.variants:
        return device_check(args)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line only
        shards = make_shards(Path(tmp), args.images, args.size)
        device = torch.device(args.device)
        torch.backends.cudnn.benchmark = True  # as artscale sets it: one input shape
        timing = (args.steps, args.batch_size, args.size)
        # The baseline runs before and after artscale's runs and its steps are pooled: on a shared
        # machine the speed drifts by tens of percent over a minute.
        article = article_loop(*timing, device, args.warmup)
        fp32 = artscale_loop(shards, Path(tmp) / "fp32", *timing, "no", device, args.warmup)
        bf16 = (
            artscale_loop(shards, Path(tmp) / "bf16", *timing, "bf16", device, args.warmup)
            if device.type == "cuda" or cpu_native_bf16()
            else None
        )
        article += article_loop(*timing, device, args.warmup)
        rates = {"article": article, "fp32": fp32, "bf16": bf16}
        if args.diffusion_size:
            d_timing = (args.steps, args.batch_size, args.diffusion_size)
            d_shards = make_shards(Path(tmp) / "d", args.images, args.diffusion_size)
            plain = diffusers_loop(*d_timing, device, args.warmup)
            opts = ("objective=diffusion", "denoiser=tiny", "max_grad_norm=1")
            rates["d32"] = artscale_loop(d_shards, Path(tmp) / "d32", *d_timing, "no", device, args.warmup, *opts)
            if device.type == "cuda" or cpu_native_bf16():
                rates["d16"] = artscale_loop(d_shards, Path(tmp) / "d16", *d_timing, "bf16", device, args.warmup, *opts)
            rates["plain"] = plain + diffusers_loop(*d_timing, device, args.warmup)
        rates = {k: args.batch_size / statistics.median(v) if v else None for k, v in rates.items()}

    def ratio(a: str, b: str) -> float | None:
        return round(rates[a] / rates[b], 2) if rates.get(a) and rates.get(b) else None

    def img_s(a: str) -> float | None:
        return round(rates[a], 2) if rates.get(a) else None

    diffusion = (
        {
            "diffusion_image_size": args.diffusion_size,
            "diffusers_loop_img_s": img_s("plain"),
            "diffusion_fp32_img_s": img_s("d32"),
            "diffusion_bf16_img_s": img_s("d16"),
            "diffusion_fp32_speedup": ratio("d32", "plain"),
            "diffusion_bf16_speedup": ratio("d16", "plain"),
        }
        if args.diffusion_size
        else {}
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        json.dumps(
            {
                "bench": "train_step",
                "batch_size": args.batch_size,
                "image_size": args.size,
                "steps": args.steps,
                "warmup": args.warmup,
                "threads": torch.get_num_threads(),
                "cpu_bf16": bool(cpu_native_bf16()),
                "device": name,
                "article_img_s": img_s("article"),
                "artscale_fp32_img_s": img_s("fp32"),
                "artscale_bf16_img_s": img_s("bf16"),
                "fp32_speedup": ratio("fp32", "article"),
                "bf16_speedup": ratio("bf16", "article"),
                **diffusion,
            }
        )
    )


if __name__ == "__main__":
    main()

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

--student S.onnx --teacher T.onnx: a distilled student at its own defaults (its steps, one pass per step)
against its teacher at --teacher-steps DPM++ steps (default 20,10; the teacher's recorded guidance), on the
CPU, --images per class, one JSON line with img/s, CPU s per image and the student's speedup over each.
    .venv/bin/python bench/sample.py --student student.onnx --teacher teacher.onnx --images 16 --rounds 2

--onnx A.onnx,B.onnx --run RUN_DIR (bench/gpu_check.sh's sampling section, on --device cuda): for each
ONNX file `artscale sample` against onnxruntime alone on the same session, its inputs and output bound
once (the same 2 x batch rows, steps x chunks runs, nothing else), then `artscale sample RUN_DIR` on
torch; one JSON line each, and one comparing them. Each session is opened, and a first chunk run
(cuDNN's algorithm search), before the clock starts.
    .venv/bin/python bench/sample.py --onnx fp32.onnx,fp16.onnx --run RUN --device cuda --images 128
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from artscale.contracts.run_dir import DENOISER_NAME, EMA_NAME, load_denoiser  # noqa: E402
from artscale.core.atomic import write_json_atomic  # noqa: E402
from artscale.core.system import usable_cores  # noqa: E402
from artscale.diffusion.noise import noise_for  # noqa: E402
from artscale.diffusion.sampling import to_uint8  # noqa: E402
from artscale.diffusion.schedulers import make_sampler, train_scheduler  # noqa: E402
from artscale.export.article import export_onnx  # noqa: E402
from artscale.infer.generate import open_session  # noqa: E402
from artscale.infer.sample import onnx_predict, sample_images  # noqa: E402
from artscale.models.denoiser import preset_denoiser  # noqa: E402
from artscale.train.checkpoint import save_final  # noqa: E402
from artscale.train.config import TrainConfig  # noqa: E402

CLASSES = ["a", "b", "c", "d", "e"]


def random_diffusion_run(run_dir: Path, preset: str, size: int, classes: list[str], seed: int = 0) -> Path:
    """A diffusion run dir of `preset` at `size` px with random-init weights (its EMA weights the same),
    saved as training saves one: final/ by `save_final`, with ema.safetensors and denoiser.json."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = preset_denoiser(preset, size, len(classes))
    weights = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    cfg = TrainConfig(
        objective="diffusion", denoiser=preset, image_size=size, run_dir=str(run_dir), data=str(run_dir / "no-shards")
    )
    scheduler = train_scheduler(cfg.prediction_type, cfg.beta_schedule).config
    record = {
        "unet": dict(unet.config),
        "scheduler": {k: v for k, v in scheduler.items() if not k.startswith("_")},
        "classes": list(classes),
        "null_label": len(classes),
        "prediction_type": cfg.prediction_type,
        "image_size": size,
    }

    def ema_and_record(folder: Path) -> None:
        save_file(weights, str(folder / EMA_NAME))
        write_json_atomic(folder / DENOISER_NAME, record)

    save_final(weights, run_dir, cfg.to_dict(), 0, ema_and_record)
    return run_dir


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
    run = random_diffusion_run(root / f"run-{preset}", preset, size, CLASSES)
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


def bound_loop(session, device: str, rows: int, size: int, calls: int) -> float:
    """Seconds of `calls` runs of onnxruntime alone on `rows` rows, inputs and output bound once on `device`."""
    where = torch.device(device)
    x = torch.randn(rows, 3, size, size, device=where)
    t = torch.full((rows,), 500, dtype=torch.int64, device=where)
    labels = torch.arange(rows, device=where) % len(CLASSES)
    out = torch.empty_like(x)
    if where.type == "cuda":  # the inputs are written on torch's stream; onnxruntime runs on its own
        torch.cuda.synchronize(where)
    binding = session.io_binding()
    for name, tensor in (("sample", x), ("timestep", t), ("class_labels", labels)):
        dtype = np.float32 if tensor.dtype == torch.float32 else np.int64
        binding.bind_input(name, where.type, where.index or 0, dtype, list(tensor.shape), tensor.data_ptr())
    binding.bind_output("prediction", where.type, where.index or 0, np.float32, list(out.shape), out.data_ptr())
    session.run_with_iobinding(binding)  # this shape's first run stays out of the timing
    if where.type == "cuda":
        torch.cuda.synchronize(where)
    start = time.perf_counter()
    for _ in range(calls):
        session.run_with_iobinding(binding)
    if where.type == "cuda":
        torch.cuda.synchronize(where)
    return time.perf_counter() - start


def first_class(models: list[Path]) -> str:
    """The first class name of the denoiser: from a run dir's final/denoiser.json, else the ONNX metadata."""
    for model in models:
        if model.is_dir():
            return json.loads((model / "final" / "denoiser.json").read_text())["classes"][0]
    import onnx

    props = {p.key: p.value for p in onnx.load(str(models[0])).metadata_props}
    return json.loads(props["classes"])[0]


def device_bench(args: argparse.Namespace) -> int:
    """--onnx/--run: one JSON line per model and a comparison; exit 1 when a model could not be measured."""
    import artscale.infer.sample as sampling
    from artscale.core.errors import UserError

    opened: dict = {}
    real_open = sampling.open_session

    def open_once(model, device, *a, **kw):  # the warm-up call opens it, the timed call reuses it
        if (model, device) not in opened:
            opened[(model, device)] = real_open(model, device, *a, **kw)
        return opened[(model, device)]

    lines, failed = [], False
    models = [Path(m) for m in args.onnx.split(",") if m] + ([Path(args.run)] if args.run else [])
    kw = dict(class_name=first_class(models), steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)
    sampling.open_session = open_once
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, model in enumerate(models):
                record = {"bench": "sample", "model": model.name, "device": args.device, "steps": args.steps}
                try:
                    sample_images(model, Path(tmp) / f"warm{i}", count=args.batch_size, device=args.device, **kw)
                    report = sample_images(model, Path(tmp) / f"timed{i}", count=args.images, device=args.device, **kw)
                except UserError as e:
                    lines.append({**record, "error": str(e)})
                    failed = True
                    continue
                shutil.rmtree(Path(tmp) / f"timed{i}")
                record.update(provider=report["provider"], batch_size=report["batch_size"], img_s=report["img_per_s"])
                if model.suffix == ".onnx":
                    session, used = opened[(model, args.device)]
                    batch, size = report["batch_size"], int(session.get_inputs()[0].shape[2])
                    calls = args.steps * math.ceil(args.images / batch)
                    where = "cuda" if used != "CPUExecutionProvider" else "cpu"
                    seconds = bound_loop(session, where, 2 * batch, size, calls)
                    record["ort_bound_img_s"] = round(args.images / seconds, 3)
                    record["fraction_of_ort_bound"] = round(record["img_s"] / record["ort_bound_img_s"], 3)
                lines.append(record)
    finally:
        sampling.open_session = real_open
    rates = {r["model"]: r["img_s"] for r in lines if "img_s" in r}
    base = rates.get(Path(args.run).name) if args.run else None
    lines.append(
        {
            "bench": "sample",
            "summary": True,
            "img_s": rates,
            "speedup_vs_run_dir": {m: round(v / base, 3) for m, v in rates.items()} if base else None,
        }
    )
    for line in lines:
        print(json.dumps(line))
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")
    return 1 if failed else 0


def distill_bench(student: Path, teacher: Path, images: int, batch: int, rounds: int, teacher_steps: list[int]) -> dict:
    """A distilled student's ONNX at its own defaults (steps, one pass per step) against its teacher's ONNX at
    each of `teacher_steps` (DPM++, the teacher's recorded guidance), on the CPU, `images` per class; each round
    measures all in turn and the best round of each counts (the machine may be shared)."""
    runs = {"student": (student, {})} | {
        f"teacher_{n}": (teacher, {"steps": n, "sampler": "dpm++"}) for n in teacher_steps
    }
    ips: dict[str, float] = {}
    cpu_s: dict[str, float] = {}
    used: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, (model, flags) in runs.items():
                out = Path(tmp) / f"{name}-{r}"
                kw = dict(count=images, seed=0, batch_size=batch, device="cpu", **flags)
                _, spent = timed(sample_images, model, out, **kw)
                report = json.loads((out / "report.json").read_text())
                ips[name] = max(ips.get(name, 0.0), report["img_per_s"])
                cpu_s[name] = min(cpu_s.get(name, math.inf), spent / report["written"])
                used[name] = {k: report[k] for k in ("sampler", "steps", "guidance", "passes_per_step", "written")}
    return {
        "bench": "distill",
        "cores": usable_cores(),
        "rounds": rounds,
        "batch_size": batch,
        "runs": used,
        "img_per_s": ips,
        "cpu_s_per_img": cpu_s,
        "student_speedup": {name: ips["student"] / ips[name] for name in ips if name != "student"},
        "student_speedup_cpu_time": {name: cpu_s[name] / cpu_s["student"] for name in cpu_s if name != "student"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny:32", help="preset:size,... (default tiny:32)")
    parser.add_argument("--images", type=int, default=40, help="images per model and round (5 classes)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--onnx", default="", help="exported denoisers, comma-separated (see above)")
    parser.add_argument("--run", default="", help="with --onnx: the run dir they came from, sampled on torch")
    parser.add_argument("--device", default="cuda", help="with --onnx/--run: auto, cpu or cuda")
    parser.add_argument("--jsonl", default="", help="with --onnx/--run: also append the lines to this file")
    parser.add_argument("--student", default="", help="a distilled student's .onnx: against --teacher (see above)")
    parser.add_argument("--teacher", default="", help="with --student: its teacher's .onnx")
    parser.add_argument("--teacher-steps", default="20,10", help="with --student: the teacher's DPM++ steps to time")
    args = parser.parse_args()
    if args.student:
        steps = [int(n) for n in args.teacher_steps.split(",") if n]
        line = distill_bench(Path(args.student), Path(args.teacher), args.images, args.batch_size, args.rounds, steps)
        print(json.dumps(line, default=lambda v: round(v, 3)))
        return
    if args.onnx or args.run:
        sys.exit(device_bench(args))
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

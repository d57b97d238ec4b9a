"""Bulk generation speed: `artscale generate` end to end against the article's per-image PyTorch
loop and against the CPU-time ceiling, all measured in this run on the same files.

    .venv/bin/python bench/generate.py                 # ~1-2 minutes on 2 cores
    .venv/bin/python bench/generate.py --images 2000 --device cuda

Ceiling: decode (draft) alone, onnxruntime alone (1 thread, pre-decoded batches) and PNG encode
alone, each per core; on CPU their per-image CPU times added up, times the cores. On a GPU the
model runs on the GPU, so the ceiling is the lower of what the cores decode and encode and what
onnxruntime alone does on that GPU, measured with the same session. The session is opened (and
warmed up) before any clock starts, and generate gets it: cuDNN's algorithm search is not timed.
The machine may be shared: CPU ms per image (process time, all threads) is reported too, as it
barely depends on what else runs. Prints one JSON line, with the device it ran on.

--input DIR takes the JPEGs of DIR instead of making a collection (bench/gpu_check.sh's prepared
tree), --repeat K generates over K hard-linked copies of them (a GPU needs more images than a small
tree holds to reach its pace), and the per-core ceilings are measured on the first --ceiling-images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artscale.core.system import usable_cores  # noqa: E402
from artscale.data.images import encode_image, load_image  # noqa: E402
from artscale.infer.generate import GPU_STREAMS, generate  # noqa: E402
from artscale.infer.session import CPU_BATCH, Runner, batch_limit, gpu_budget, open_session  # noqa: E402


def make_collection(root: Path, count: int, min_side: int, max_side: int) -> list[Path]:
    """Mixed-size JPEGs like an art collection: smooth gradients, blocks and grain."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 255
        arr = base + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
        for _ in range(4):
            x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
            arr[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 255, 3)
        path = root / f"c{i % 5}" / f"art_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def linked_tree(src: Path, root: Path, repeat: int) -> list[Path]:
    """The JPEGs under src, `repeat` times under root (r0/..., r1/...): hard links where the filesystem
    allows, else copies. Sorted as generate lists them."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    paths = []
    for k in range(repeat):
        for f in files:
            dst = root / f"r{k}" / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dst)
            except OSError:
                shutil.copyfile(f, dst)
            paths.append(dst)
    return paths


def export_random_model(root: Path, size: int):
    """Speed does not depend on the weights: a random model, exported the usual way."""
    import torch

    from artscale.export.article import export_onnx
    from artscale.models.article import ConvDiffusionModel
    from artscale.train.checkpoint import save_final
    from artscale.train.config import TrainConfig

    torch.manual_seed(0)
    model = ConvDiffusionModel().eval()
    save_final(model.state_dict(), root / "run", TrainConfig(image_size=size).to_dict(), 0)
    export_onnx(root / "run", root / "model.onnx")
    return model, root / "model.onnx"


def article_loop(model, paths: list[Path], out: Path, size: int, device: str = "cpu") -> tuple[float, float]:
    """The article's generation: one file at a time, verify, reopen, transform, forward, save_image;
    on the device artscale's run used (save_image's copy back to the host waits for the GPU)."""
    import torch
    from torchvision import transforms
    from torchvision.utils import save_image

    transform = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    out.mkdir(parents=True)
    model = model.to(device)
    with torch.no_grad():  # warm-up: CUDA's context and kernels are not the loop's cost
        model(torch.zeros(1, 3, size, size, device=device)).cpu()
    start, cpu = time.perf_counter(), time.process_time()
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im.verify()
        image = transform(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
        with torch.no_grad():
            generated = model(image)
        save_image(generated, out / f"{i}.png")
    return len(paths) / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / len(paths)


def device_name(provider: str) -> str:
    """What the model ran on: the GPU's name from nvidia-smi, or the CPU's model name."""
    import subprocess

    if provider != "CPUExecutionProvider":
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        return f"{provider}: {out.stdout.splitlines()[0].strip() if out.returncode == 0 else 'GPU'}"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPUExecutionProvider: {line.split(':', 1)[1].strip()}"
    return "CPUExecutionProvider"


def ceiling(model_path: Path, paths: list[Path], size: int, batch: int, opened: tuple, gpu_images: int = 0) -> dict:
    """Per-core rates of each CPU stage alone (CPU time of this thread: load on the machine does
    not count), and onnxruntime alone, wall clock, with generate's own session, streams and batches."""
    start = time.thread_time()
    decoded = [np.asarray(load_image(p, (size, size))[0]) for p in paths]
    decode = len(paths) / (time.thread_time() - start)

    def split(batch: int) -> list[np.ndarray]:
        return [np.stack(decoded[i : i + batch]) for i in range(0, len(decoded) - batch + 1, batch)]

    # intra_op_num_threads=1: onnxruntime computes in the calling thread, so thread_time sees it all.
    cpu_runner = Runner(open_session(model_path, "cpu", False, "default", threads=1)[0], None)
    batches = split(batch or CPU_BATCH)
    start = time.thread_time()
    outs = [cpu_runner(b) for b in batches]
    one_thread = len(batches) * len(batches[0]) / (time.thread_time() - start)
    # As generate runs it: `cores` runs side by side on CPU; on a GPU, two batches in flight.
    session, used = opened
    on_gpu = used != "CPUExecutionProvider"
    streams = GPU_STREAMS if on_gpu else usable_cores()
    runner = Runner(session, "cuda" if on_gpu else None)
    budget = gpu_budget() if on_gpu else 0
    batches = split(min(len(decoded), batch_limit(size, size, on_gpu=on_gpu, requested=batch, budget=budget)))
    if on_gpu:  # the decoded images, again and again, until the GPU has at least gpu_images to do
        batches *= max(1, -(-gpu_images // (len(batches) * len(batches[0]))))
    runner(batches[0])  # this batch size's first run (cuDNN picks its algorithms) stays out of the timing
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(runner, batches))  # each run returns its output on the host: the GPU is done
    alone = len(batches) * len(batches[0]) / (time.perf_counter() - start)
    images = [Image.fromarray(o) for b in outs for o in b]
    start = time.thread_time()
    for im in images:
        encode_image(im, "png")
    encode = len(images) / (time.thread_time() - start)
    cpu_side = 1 / decode + 1 / encode
    per_image = cpu_side + 1 / one_thread
    return {
        "decode_img_s_per_core": decode,
        "ort_img_s_per_core": one_thread,
        "encode_png_img_s_per_core": encode,
        "ceiling_img_s": min(usable_cores() / cpu_side, alone) if on_gpu else usable_cores() / per_image,
        "ceiling_cpu_ms_per_img": (cpu_side if on_gpu else per_image) * 1000,
        "ort_alone_img_s": alone,
        "ort_alone_batch": len(batches[0]),
        "ort_alone_provider": used,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--min-side", type=int, default=300)
    p.add_argument("--max-side", type=int, default=1600)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=0, help="0: generate's default for the device")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--article-images", type=int, default=60, help="files for the (slow) article loop")
    p.add_argument("--input", default="", help="the JPEGs of this folder instead of a made collection")
    p.add_argument("--repeat", type=int, default=1, help="with --input: generate over this many copies of it")
    p.add_argument("--ceiling-images", type=int, default=0, help="images for the per-core ceilings (0: all)")
    p.add_argument("--jsonl", default="", help="also append the JSON line to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line only
        root = Path(tmp)
        if args.input:
            paths = linked_tree(Path(args.input), root / "in", args.repeat)
        else:
            paths = make_collection(root / "in", args.images, args.min_side, args.max_side)
        model, onnx_path = export_random_model(root, args.size)
        # Opened and warmed up once, before any clock: the timed run starts with a ready session.
        opened = open_session(onnx_path, args.device, False, "default", threads=1, varied_shapes=False)
        few = paths[: args.ceiling_images or len(paths)]
        parts = ceiling(onnx_path, few, args.size, args.batch_size, opened, gpu_images=len(paths))
        cpu = time.process_time()
        report = generate(
            onnx_path,
            root / "in",
            root / "out",
            device=args.device,
            size=args.size,
            batch_size=args.batch_size,
            workers=args.workers,
            session=opened,
        )
        ours_cpu_ms = (time.process_time() - cpu) * 1000 / max(report["written"], 1)
        import torch

        torch_device = "cuda" if report["provider"] != "CPUExecutionProvider" and torch.cuda.is_available() else "cpu"
        article, article_cpu_ms = article_loop(
            model, paths[: args.article_images], root / "article", args.size, torch_device
        )

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # its CPU cost per image without OpenMP threads spinning on a busy machine
        _, article_cpu_ms_1t = article_loop(
            model, paths[: args.article_images // 2], root / "article-1t", args.size, torch_device
        )
        torch.set_num_threads(threads)
    ours = report["img_per_s"]
    result = {
        "bench": "generate",
        "images": len(paths),
        "size": args.size,
        "cores": usable_cores(),
        "provider": report["provider"],
        "device": device_name(report["provider"]),
        "article_device": torch_device,
        "artscale_img_s": ours,
        "article_img_s": article,
        "speedup_vs_article": ours / article,
        "artscale_cpu_ms_per_img": ours_cpu_ms,
        "article_cpu_ms_per_img": article_cpu_ms,
        "article_cpu_ms_per_img_1_thread": article_cpu_ms_1t,
        "cpu_speedup_vs_article_1_thread": article_cpu_ms_1t / ours_cpu_ms,
        **parts,
        "fraction_of_ceiling": ours / parts["ceiling_img_s"],
        "fraction_of_ort_alone": ours / parts["ort_alone_img_s"],
        "cpu_efficiency_vs_ceiling": parts["ceiling_cpu_ms_per_img"] / ours_cpu_ms,
        "load_avg_1min": os.getloadavg()[0],
    }
    line = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
    print(line)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

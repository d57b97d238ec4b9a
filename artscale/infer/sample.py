"""`artscale sample`: new images from noise with a diffusion denoiser, an ONNX file or a run dir.

The loop is diffusion.sample's, whoever evaluates the network: an onnxruntime session (an
exported .onnx, the scheduler rebuilt from its metadata) or the PyTorch model of a run dir.
Work is numbered: image i of a class starts from noise (seed, i) alone, and images go through the
denoiser in fixed chunks of --batch-size positions, so a shard, a rerun or a resumed run computes
exactly the batches one uninterrupted run computes and writes the same bytes. Each file is written
under a temporary name and renamed; a chunk whose files all exist is skipped.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from artscale.contracts.onnx import DENOISER_INPUTS, DENOISER_OUTPUT, GPU_PROVIDERS
from artscale.core.atomic import refuse_linked_folders
from artscale.core.checks import printable
from artscale.core.errors import UserError
from artscale.core.progress import Progress
from artscale.core.system import onnxruntime, usable_cores
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import Predict, sample, to_uint8, torch_predict
from artscale.diffusion.schedulers import SAMPLERS, make_sampler
from artscale.infer.outputs import EXTENSIONS, done, plan, shard_chunks, write_image, write_report
from artscale.infer.session import denoiser_bytes_per_pixel, gpu_budget, open_session, placement

CPU_CHUNK, GPU_CHUNK = 16, 64  # default images per chunk, --batch-size 0 (x2 network rows with guidance)


# Rows per onnxruntime run on CPU: one run's activations stay in the core's cache. Measured with one
# thread: the tiny preset at 32 px made 228 rows/s in runs of 8 rows, 208 in 16 and 189 in 64; the small
# one at 128 px 2.4 rows/s in runs of 1 row and 2.0-2.1 in 2-16.
CPU_RUN_PIXELS = 8 * 32 * 32


def onnx_predict(session, streams: int = 0) -> Predict:
    """The `predict` of an exported denoiser: torch tensors in and out, the whole batch in one run.

    With `streams` >= 1 (a CPU session of one thread) the rows go in runs of CPU_RUN_PIXELS, `streams`
    runs at once on the one session (Run is thread-safe and releases the GIL), each on its own core
    with no cross-thread hand-off between onnxruntime's many small ops. The runs depend on the batch
    alone, not on the core count, so every machine computes the same pixels (bench/sample.py compares
    it with one multi-threaded run of the whole batch)."""
    pool = ThreadPoolExecutor(streams, "denoise") if streams >= 1 else None

    def run(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        feed = dict(zip(DENOISER_INPUTS, (x.contiguous().numpy(), t.numpy(), labels.numpy())))
        return session.run([DENOISER_OUTPUT], feed)[0]

    def predict(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = max(1, CPU_RUN_PIXELS // (x.shape[2] * x.shape[3]))
        if pool is None or x.shape[0] <= rows:
            return torch.from_numpy(run(x, t, labels))
        split = [v.split(rows) for v in (x, t, labels)]
        return torch.from_numpy(np.concatenate(list(pool.map(run, *split))))

    return predict


def bound_predict(session, device: torch.device, stream: torch.cuda.Stream | None = None, max_rows: int = 0) -> Predict:
    """The `predict` of an exported denoiser through IO binding, the tensors staying on `device`.

    The same code for "cpu" and "cuda". Per thread and batch shape, fixed input and output tensors are
    bound once (one binding per run of at most `max_rows` rows; 0: the whole batch in one run); a call
    copies its inputs into them, runs, and returns the output tensor, which the thread's next call of
    that shape overwrites (diffusion.sample consumes it before then). generate runs two batches at
    once on a GPU: each thread has its own buffers.

    On CUDA, `stream` is the one onnxruntime computes on (open_denoiser): the copies, the runs and
    whatever the caller queues next are ordered on it, and no run waits for the host. A caller on
    another stream is ordered against it by events, not by waiting. Without `stream` (a session opened
    elsewhere) the host waits for the caller's stream before each run and for onnxruntime's after it."""
    kind, index = device.type, device.index or 0
    cuda = kind == "cuda"
    local = threading.local()
    run_options = None
    if cuda and stream is not None:
        ort = onnxruntime()

        run_options = ort.RunOptions()  # the host does not wait for the stream at the end of a run
        run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def buffers(shape: tuple) -> tuple:
        cache = local.__dict__.setdefault("buffers", {})
        if shape not in cache:
            n = shape[0]
            tensors = (
                torch.empty(shape, dtype=torch.float32, device=device),
                torch.empty(n, dtype=torch.int64, device=device),
                torch.empty(n, dtype=torch.int64, device=device),
            )
            out = torch.empty(shape, dtype=torch.float32, device=device)
            step = max_rows if 0 < max_rows < n else n
            bindings = []
            for i in range(0, n, step):
                binding = session.io_binding()
                for name, tensor in zip(DENOISER_INPUTS, tensors):
                    part = tensor[i : i + step]
                    dtype = np.float32 if part.dtype == torch.float32 else np.int64
                    binding.bind_input(name, kind, index, dtype, list(part.shape), part.data_ptr())
                part = out[i : i + step]
                binding.bind_output(DENOISER_OUTPUT, kind, index, np.float32, list(part.shape), part.data_ptr())
                bindings.append(binding)
            cache[shape] = (tensors, out, bindings)
        return cache[shape]

    def predict(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (bx, bt, bl), out, bindings = buffers(tuple(x.shape))
        caller = torch.cuda.current_stream(device) if cuda else None
        switch = stream is not None and caller != stream
        if switch:
            stream.wait_stream(caller)  # x, t and labels are written on the caller's stream
        with torch.cuda.stream(stream) if switch else contextlib.nullcontext():
            bx.copy_(x)
            bt.copy_(t)
            bl.copy_(labels)
            if run_options is not None:
                for binding in bindings:
                    session.run_with_iobinding(binding, run_options)
            else:
                if cuda:
                    caller.synchronize()  # onnxruntime's own stream knows nothing of torch's
                for binding in bindings:
                    session.run_with_iobinding(binding)
                    binding.synchronize_outputs()
        if switch:
            caller.wait_stream(stream)
            for tensor in (x, t, labels):  # the caching allocator must not reuse them before the copies ran
                tensor.record_stream(stream)
        return out

    return predict


def split_predict(predict: Predict, max_rows: int) -> Predict:
    """`predict` (one that returns a new tensor per call) on at most `max_rows` rows at a time."""
    if max_rows <= 0:
        return predict

    def split(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= max_rows:
            return predict(x, t, labels)
        return torch.cat([predict(*part) for part in zip(x.split(max_rows), t.split(max_rows), labels.split(max_rows))])

    return split


def max_rows(first_channels: int, size: int, streams: int = 1) -> int:
    """Rows of `size` px one denoiser run may take when `streams` runs share the GPU's budget."""
    return max(1, gpu_budget() // (streams * denoiser_bytes_per_pixel(first_channels) * size * size))


def open_denoiser(
    model: Path,
    device: str,
    allow_cpu_fallback: bool,
    provider: str = "default",
    cache_dir: Path | None = None,
) -> tuple[Any, str, torch.cuda.Stream | None]:
    """(session, provider used, stream) for an exported denoiser: on a GPU, onnxruntime computes on a
    torch stream (`user_compute_stream`; torch's default stream cannot be given, onnxruntime reads its
    0 as none), so the torch loop around it never waits for the host. No stream where torch has no CUDA."""
    stream = torch.cuda.Stream() if device != "cpu" and torch.cuda.is_available() else None
    session, used = open_session(
        model,
        device,
        allow_cpu_fallback,
        provider,
        threads=1,
        cache_dir=cache_dir,
        stream=stream.cuda_stream if stream is not None else 0,
    )
    return session, used, stream if used in GPU_PROVIDERS else None


class Sampling(NamedTuple):
    """The sampler, steps and guidance a run uses, where each came from ("flag", "model", or "default": neither
    the flag nor the model says), and the guidance the loop applies (1 for a student whose guidance is baked in:
    one pass per step)."""

    sampler: str
    steps: int
    guidance: float
    loop_guidance: float
    sources: dict[str, str]
    distilled: dict[str, Any] | None


# What a model that records nothing samples with (artscale's defaults before runs recorded theirs).
FALLBACK_SAMPLING = {"sampler": "dpm++", "steps": 20, "guidance": 3.0}


def resolve_sampling(
    meta: dict[str, Any], sampler: str | None = None, steps: int | None = None, guidance: float | None = None
) -> Sampling:
    """A flag where given, else the model's `sampling` record (denoiser.json, ONNX metadata), else its training
    config's sampler, sample_steps and guidance, else FALLBACK_SAMPLING. A distilled student's guidance is fixed:
    another --guidance is refused in one line."""
    record = meta.get("sampling") or {}
    config = meta.get("config") or {}
    recorded = {
        "sampler": record.get("sampler", config.get("sampler")),
        "steps": record.get("steps", config.get("sample_steps")),
        "guidance": record.get("guidance", config.get("guidance")),
    }
    flags = {"sampler": sampler, "steps": steps, "guidance": guidance}
    chosen, sources = {}, {}
    for key, flag in flags.items():
        if flag is not None:
            chosen[key], sources[key] = flag, "flag"
        elif recorded[key] is not None:
            chosen[key], sources[key] = recorded[key], "model"
        else:
            chosen[key], sources[key] = FALLBACK_SAMPLING[key], "default"
    if chosen["sampler"] not in SAMPLERS:
        raise UserError(f"sampler {chosen['sampler']!r}: choose one of {', '.join(SAMPLERS)}")
    distilled = meta.get("distilled") or None
    loop_guidance = float(chosen["guidance"])
    if record.get("guidance_baked"):
        baked = float(record["guidance"])
        if guidance is not None and float(guidance) != baked:
            raise UserError(
                f"--guidance {guidance:g}: this model is a distilled student with guidance {baked:g} baked in; "
                f"leave --guidance out (or give {baked:g}), or sample its teacher"
            )
        loop_guidance = 1.0
    return Sampling(
        str(chosen["sampler"]), int(chosen["steps"]), float(chosen["guidance"]), loop_guidance, sources, distilled
    )


class Opened(NamedTuple):
    """What sample_images runs: the predict, the denoiser's metadata, where it runs, and how."""

    predict: Predict
    meta: dict[str, Any]
    provider: str
    device: torch.device
    stream: torch.cuda.Stream | None = None
    nodes: dict[str, int] = {}


def first_channels(meta: dict[str, Any]) -> int:
    """Channels of the UNet's first level (what its memory grows with), from a run dir's or an ONNX file's metadata."""
    from artscale.models.denoiser import DENOISER_PRESETS, denoiser_shape

    if "unet" in meta:
        return int(meta["unet"]["block_out_channels"][0])
    config = meta.get("config") or {}
    try:
        return int(denoiser_shape(config.get("denoiser", "base"), config.get("block_out_channels") or ())[0][0])
    except UserError:  # a preset this version does not know: assume the largest
        return DENOISER_PRESETS["base"][0][0]


def open_model(model: Path, device: str, allow_cpu_fallback: bool, weights: str, threads: int) -> Opened:
    """The denoiser of an .onnx file or a run dir, ready to sample: see Opened."""
    if model.is_dir():
        from artscale.contracts.run_dir import CONFIG_NAME, load_denoiser
        from artscale.contracts.run_files import read_config

        unet, meta = load_denoiser(model, weights)
        meta = {**meta, "config": read_config(Path(meta["path"]) / CONFIG_NAME) or {}}  # old runs: their sampling
        cuda = device != "cpu" and torch.cuda.is_available()
        if device == "cuda" and not cuda and not allow_cpu_fallback:
            raise UserError("--device cuda: torch sees no CUDA here; use --device cpu, or add --allow-cpu-fallback")
        where = torch.device("cuda" if cuda else "cpu")
        predict = torch_predict(unet.to(where))
        if cuda:
            predict = split_predict(predict, max_rows(first_channels(meta), int(meta["image_size"])))
        return Opened(predict, meta, f"torch-{where.type}", where)
    if not model.is_file():
        raise UserError(f"model {model} not found (an .onnx from `artscale export`, or a diffusion run dir)")
    from artscale.contracts.onnx import read_metadata

    session, used, stream = open_denoiser(model, device, allow_cpu_fallback)
    meta = read_metadata(session, model)
    rows = max_rows(first_channels(meta), int(meta["image_size"])) if stream is not None else 0
    where = stream.device if stream is not None else torch.device("cpu")
    predict = session_predict(session, used, threads, stream, rows)
    return Opened(predict, meta, used, where, stream, placement(session))


def session_predict(
    session, used: str, threads: int, stream: torch.cuda.Stream | None = None, rows: int = 0
) -> Predict:
    """The predict for an onnxruntime session on provider `used`. With a stream (torch has CUDA) the
    loop stays on the GPU through IO binding, at most `rows` rows a run. Without one: on the CPU the
    rows go in single-threaded runs, `threads` at once; on a GPU (a CPU-only torch beside
    onnxruntime-gpu) the whole batch goes in one run, onnxruntime copying it across."""
    if stream is not None:
        return bound_predict(session, stream.device, stream, rows)
    return onnx_predict(session, streams=threads if used == "CPUExecutionProvider" else 0)


def _stay_inside(out_dir: Path, items: list) -> None:
    """Belt and braces to plan's rule for class names: every output path, normalised, lies inside OUT."""
    root = os.path.abspath(out_dir)
    for it in items:
        path = os.path.normpath(os.path.join(root, it.out))
        if os.path.commonpath([root, path]) != root or path == root:
            raise UserError(f"{printable(it.out)}: an output path outside OUT_DIR {out_dir}; nothing written")


def sample_images(
    model: str | Path,
    out_dir: str | Path,
    *,
    count: int = 16,
    class_name: str = "all",
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    image_format: str = "png",
    quality: int = 95,
    batch_size: int = 0,
    device: str = "auto",
    allow_cpu_fallback: bool = False,
    weights: str = "ema",
    num_shards: int = 1,
    shard_index: int = 0,
) -> dict[str, Any]:
    """Sample this shard's images of the run into OUT_DIR; returns the report (also written as JSON).
    steps, sampler, guidance: None takes the model's own (resolve_sampling)."""
    model, out_dir = Path(model), Path(out_dir)
    if count < 1 or (steps is not None and steps < 1) or batch_size < 0:
        raise UserError("--count and --steps must be >= 1, --batch-size >= 0 (0: chosen for the device)")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index {shard_index} --num-shards {num_shards}: need 0 <= shard-index < num-shards")
    if sampler is not None and sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    if image_format not in EXTENSIONS:
        raise UserError(f"--format {image_format}: choose one of {', '.join(EXTENSIONS)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {out_dir} exists and is not a folder")
    opened = open_model(model, device, allow_cpu_fallback, weights, usable_cores())
    predict, meta, used, where = opened.predict, opened.meta, opened.provider, opened.device
    chosen = resolve_sampling(meta, sampler, steps, guidance)
    sampler, steps, guidance = chosen.sampler, chosen.steps, chosen.guidance
    schedule = make_sampler(sampler, meta["scheduler"])  # the training scheduler's betas and prediction type
    size, null_label = int(meta["image_size"]), int(meta["null_label"])
    batch_size = batch_size or (CPU_CHUNK if used in ("CPUExecutionProvider", "torch-cpu") else GPU_CHUNK)
    items = plan(list(meta["classes"]), class_name, count, EXTENSIONS[image_format], model)
    _stay_inside(out_dir, items)
    chunks = shard_chunks(items, batch_size, num_shards, shard_index)

    started = time.perf_counter()
    mine = sum(map(len, chunks))
    refuse_linked_folders(out_dir, [it.out for c in chunks for it in c])
    there = dict(zip((it.out for c in chunks for it in c), done(out_dir, [it.out for c in chunks for it in c])))
    todo = [c for c in chunks if not all(there[it.out] for it in c)]
    already = sum(there.values())
    written = 0
    bar, lock = Progress(mine, "sample", unit="img", initial=already), threading.Lock()

    def tick(future: Future) -> None:
        if future.exception() is None:
            with lock:
                bar.update(1)

    torch_threads = torch.get_num_threads()
    if not used.startswith("torch"):  # the scheduler's few small ops; torch's idle OpenMP threads would spin
        torch.set_num_threads(1)  # the cores belong to onnxruntime's runs; torch's own threads would contend
    # Files are encoded and written by a pool while the next chunk samples: the device does not wait
    # for PNG encoders. A chunk's writes are collected after the next chunk, so at most two chunks of
    # images wait in memory, and a failed write (a full disk) stops the run within a chunk.
    writers = ThreadPoolExecutor(max(1, min(4, usable_cores())), "write")
    pending: list[Future] = []
    try:
        with torch.cuda.stream(opened.stream) if opened.stream is not None else contextlib.nullcontext():
            for chunk in todo:
                noise = noise_for(seed, [it.index for it in chunk], (3, size, size)).to(where)
                labels = torch.tensor([it.label for it in chunk])
                images = to_uint8(
                    sample(predict, schedule, noise, labels, null_label, steps=steps, guidance=chosen.loop_guidance)
                )
                previous, pending = pending, []
                for it, pixels in zip(chunk, images):
                    if not there[it.out]:  # the rest of the chunk was written before an interruption
                        job = writers.submit(
                            write_image, out_dir, it.out, np.ascontiguousarray(pixels), None, image_format, quality
                        )
                        job.add_done_callback(tick)
                        pending.append(job)
                for job in previous:
                    job.result()
                    written += 1
        for job in pending:
            job.result()
            written += 1
    finally:
        writers.shutdown(wait=True)
        torch.set_num_threads(torch_threads)
        bar.close()
    wall = time.perf_counter() - started
    report = {
        "model": str(model),
        "out_dir": str(out_dir),
        "class": class_name,
        "classes": list(meta["classes"]),
        "count": count,
        "images_in_run": len(items),
        "images_in_shard": mine,
        "shard_index": shard_index,
        "num_shards": num_shards,
        "written": written,
        "already_done": already,
        "provider": used,
        "nodes_by_provider": opened.nodes,
        "device": device,
        "steps": steps,
        "sampler": sampler,
        "guidance": guidance,
        "sampling_from": chosen.sources,  # each of sampler, steps, guidance: flag, model or default
        "passes_per_step": 2 if chosen.loop_guidance != 1.0 else 1,
        "distilled": chosen.distilled,
        "seed": seed,
        "batch_size": batch_size,
        "format": image_format,
        "wall_s": round(wall, 3),
        "img_per_s": round(written / wall, 3) if wall > 0 else 0.0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_report(out_dir, report)
    print(
        f"sampled {written} images ({already} already there) in {wall:.1f} s, {report['img_per_s']} img/s "
        f"on {used} ({sampler}, {steps} steps, guidance {guidance:g}{', baked in' if chosen.distilled else ''}); "
        f"report: {path}"
    )
    return report

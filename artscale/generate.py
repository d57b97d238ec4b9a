"""Bulk generation: an exported model over a directory tree, mirrored into OUT_DIR.

decode threads (images.py, `draft()` for JPEGs) -> a bounded window -> batches of equal size
through one onnxruntime session -> encode/write threads. Pillow and onnxruntime release the GIL,
so plain threads overlap on real cores. Each output is written under a temporary name and
renamed; a rerun skips outputs that exist. No torch here: workers start in well under a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from artscale import multiple_of_8, usable_cores
from artscale.atomic import write_atomic, write_json_atomic
from artscale.errors import UserError
from artscale.images import SkipImage, encode_image, load_image, resize_image
from artscale.listing import LISTING, Entry, list_inputs, read_listing, shard_of, write_listing
from artscale.progress import Progress

INPUT, OUTPUT = "images", "generated"
TMP_SUFFIX = ".artscale-tmp"
EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# A CPU run holds ~0.55 KB per pixel (measured: 283 MB for 2 x 512 x 512): large --native images
# go in smaller batches, so memory stays near 0.3 GB per inference stream.
MAX_BATCH_PIXELS = 8 * 256 * 256
CPU_BATCH, GPU_BATCH = 2, 32  # default images per session run (--batch-size 0)


def native_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """An image's own size, scaled down to fit max_side, each side rounded to a multiple of 8."""
    scale = min(1.0, max_side / max(size))
    return tuple(max(8, int(side * scale / 8 + 0.5) * 8) for side in size)  # type: ignore[return-value]


def _cuda_hint() -> str:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver here (libcuda.so.1 not found)"
    return "CUDA 13 / cuDNN 9 libraries missing or no usable GPU"


def open_session(
    model: Path,
    device: str,
    allow_cpu_fallback: bool,
    provider: str,
    threads: int,
    cache_dir: Path | None = None,
    varied_shapes: bool = False,
):
    """An onnxruntime session on the device asked for; returns (session, provider actually used).

    onnxruntime quietly runs on CPU when CUDA cannot start, so `cuda` is checked: the CPU fallback
    is disabled in the session, and `get_providers()` is read back after creation.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # its C++ lines about missing libraries: we say it in one line

    def options(strict: bool):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Decode/encode threads share these cores: idle onnxruntime workers must sleep, not spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if strict:
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return opts

    def cpu_session():
        try:
            return ort.InferenceSession(str(model), options(False), providers=["CPUExecutionProvider"])
        except Exception as e:  # InvalidProtobuf, NoSuchFile, Fail: not a usable model
            raise UserError(f"cannot load {model} as an ONNX model: {str(e).splitlines()[0][:200]}") from None

    if device == "cpu":
        return cpu_session(), "CPUExecutionProvider"
    available = ort.get_available_providers()
    # cuDNN's exhaustive algorithm search runs once per input shape: worth it for one size only.
    wanted: list = [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC" if varied_shapes else "EXHAUSTIVE"})
    ]
    if provider == "tensorrt":  # engines are built per input shape: cache them beside the outputs
        wanted.insert(
            0,
            (
                "TensorrtExecutionProvider",
                {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir or ".")},
            ),
        )
    names = [name for name, _ in wanted]
    problem = ""
    if not set(names) <= set(available):
        problem = (
            f"this onnxruntime has no {' or '.join(n for n in names if n not in available)} (install onnxruntime-gpu)"
        )
    else:
        if provider == "tensorrt" and cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip wheels torch brings, without importing torch
        # Strict first (every node on the GPU); then let a few nodes sit on CPU, as long as the GPU runs.
        for strict in (True, False):
            printed = io.StringIO()  # onnxruntime prints a 4-line "EP Error" block when TensorRT cannot start
            try:
                with contextlib.redirect_stdout(printed):
                    session = ort.InferenceSession(
                        str(model), options(strict), providers=wanted if strict else [*wanted, "CPUExecutionProvider"]
                    )
            except Exception as e:  # the fallback-disabled Fail, or a model error the CPU session names below
                problem = str(e).splitlines()[0][:160]
                continue
            used = session.get_providers()[0]
            if used in GPU_PROVIDERS:
                if provider == "tensorrt" and used != "TensorrtExecutionProvider":
                    print(
                        f"artscale: TensorRT did not start (TensorRT libraries missing?); running on {used}",
                        file=sys.stderr,
                    )
                return session, used
            problem = f"onnxruntime chose {used}"
    session = cpu_session()
    why = problem if problem.startswith("this onnxruntime") else _cuda_hint()
    if device == "cuda" and not allow_cpu_fallback:
        raise UserError(f"--device cuda: CUDA does not run here ({why}); use --device cpu, or add --allow-cpu-fallback")
    print(f"artscale: --device {device}: CUDA does not run here ({why}); running on CPU", file=sys.stderr)
    return session, "CPUExecutionProvider"


class Runner:
    """session.run for one batch. With IO binding (a GPU), inputs and outputs go through host
    buffers kept per batch shape, page-locked (pinned) when CUDA is there: onnxruntime's copies
    to and from the device then run at full PCIe speed, with no staging copy in the driver."""

    def __init__(self, session, io_device: str | None) -> None:
        self.session = session
        self.binding = session.io_binding() if io_device else None
        self.pinned = io_device == "cuda"
        self.buffers: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # shape -> (input, output)

    def _host_pair(self, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        if shape not in self.buffers:
            if len(self.buffers) >= 4:  # --native sees many shapes: keep a few, like any cache
                self.buffers.pop(next(iter(self.buffers)))
            self.buffers[shape] = (self._alloc(shape), self._alloc(shape))
        return self.buffers[shape]

    def _alloc(self, shape: tuple) -> np.ndarray:
        if self.pinned:
            try:
                import torch  # its pinned allocator; only a GPU run pays for the import

                return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()
            except Exception as e:  # a CUDA-less torch: pageable memory still works, a bit slower
                print(
                    f"artscale: pinned host memory unavailable ({type(e).__name__}); using pageable buffers",
                    file=sys.stderr,
                )
                self.pinned = False
        return np.empty(shape, np.uint8)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.binding is None:
            return self.session.run([OUTPUT], {INPUT: batch})[0]
        host_in, host_out = self._host_pair(batch.shape)
        np.copyto(host_in, batch)
        shape = list(batch.shape)
        self.binding.bind_input(INPUT, "cpu", 0, np.uint8, shape, host_in.ctypes.data)
        self.binding.bind_output(OUTPUT, "cpu", 0, np.uint8, shape, host_out.ctypes.data)
        self.session.run_with_iobinding(self.binding)
        return host_out.copy()  # the buffer is reused by the next batch


def _decode(path: Path, size: int, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    if size:
        im, original = load_image(path, (size, size))
    else:
        im, original = load_image(path)
        target = native_size(original, max_side)
        if im.size != target:
            im = resize_image(im, target)
    return np.asarray(im), original


def _write(path: Path, pixels: np.ndarray, original: tuple[int, int] | None, fmt: str, quality: int) -> None:
    im = Image.fromarray(pixels, "RGB")
    if original and im.size != original:
        im = resize_image(im, original)
    data = encode_image(im, fmt, quality)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")  # one name per output: a rerun overwrites a stale one
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, tmp=tmp)
    except OSError as e:  # a full disk, a quota, a read-only mount: the run stops, what is written stays
        raise UserError(
            f"cannot write {path}: {e.strerror or e}; the outputs written so far are kept, run again to continue"
        ) from None


def _check_args(
    model: Path,
    in_dir: Path,
    out_dir: Path,
    num_shards: int,
    shard_index: int,
    quality: int,
    size: int,
    batch_size: int,
    workers: int,
) -> None:
    if not model.is_file():
        raise UserError(f"model {model} not found")
    if not in_dir.is_dir():
        raise UserError(f"input folder {in_dir} not found")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {out_dir} exists and is not a folder")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents:
        raise UserError(
            f"OUT_DIR {out_dir} is inside IN_DIR {in_dir}: its outputs would become inputs; choose another place"
        )
    if dst in src.parents:
        raise UserError(
            f"IN_DIR {in_dir} is inside OUT_DIR {out_dir}: outputs could land among the inputs; choose another place"
        )
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(
            f"--shard-index {shard_index} --num-shards {num_shards}: need num-shards >= 1 and 0 <= shard-index < num-shards"
        )
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: must be 1..100")
    if size and not multiple_of_8(size):
        raise UserError(f"--size {size}: must be a positive multiple of 8")
    if batch_size < 0 or workers < 0:
        raise UserError("--batch-size and --workers must be >= 0 (0: chosen for the device)")


def shard_entries(
    in_dir: Path, out_dir: Path, ext: str, follow_symlinks: bool, num_shards: int, shard_index: int
) -> list[Entry]:
    """This shard's entries of IN_DIR: from OUT_DIR's listing when a sharded run has one (see
    `--list-only`), else from a walk of the tree."""
    listing = read_listing(out_dir, in_dir, ext, follow_symlinks) if num_shards > 1 else None
    if listing is not None:
        print(
            f"artscale: reading the listing {out_dir / LISTING} ({len(listing.entries)} files, made {listing.created})",
            file=sys.stderr,
        )
    entries = listing.entries if listing is not None else list_inputs(in_dir, ext, follow_symlinks)
    return [e for e in entries if shard_of(e.rel, num_shards) == shard_index]


def report_name(num_shards: int, shard_index: int) -> str:
    return "report.json" if num_shards == 1 else f"report-{shard_index}-of-{num_shards}.json"


def write_report(out_dir: Path, report: dict) -> Path:
    """report.json (report-I-of-K.json for a shard), written atomically."""
    path = out_dir / report_name(report["num_shards"], report["shard_index"])
    write_json_atomic(path, report, sort_keys=False, tmp=out_dir / f".{path.name}{TMP_SUFFIX}")
    return path


def make_listing(model: Path, in_dir: Path, out_dir: Path, image_format: str, follow_symlinks: bool) -> dict:
    """`--list-only`: walk IN_DIR once and write OUT_DIR/listing.jsonl for an array's tasks and its merge."""
    _check_args(model, in_dir, out_dir, 1, 0, 95, 0, 0, 0)
    started = time.perf_counter()
    listing = write_listing(in_dir, out_dir, EXTENSIONS[image_format], follow_symlinks)
    todo = sum(1 for e in listing.entries if e.out)
    wall = time.perf_counter() - started
    print(
        f"listed {len(listing.entries)} files ({todo} to generate) under {in_dir} in {wall:.1f} s: {out_dir / LISTING}"
    )
    return {"files": len(listing.entries), "to_generate": todo, "wall_s": round(wall, 3)}


def generate(
    model: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    num_shards: int = 1,
    shard_index: int = 0,
    device: str = "auto",
    allow_cpu_fallback: bool = False,
    provider: str = "default",
    image_format: str = "png",
    quality: int = 95,
    size: int = 0,
    native: bool = False,
    max_side: int = 1024,
    restore_size: bool = False,
    batch_size: int = 0,
    workers: int = 0,
    follow_symlinks: bool = False,
    list_only: bool = False,
    session: tuple | None = None,
) -> dict:
    """Run MODEL over this shard of IN_DIR into OUT_DIR; returns the report (also written as JSON).

    `session`: a (session, provider) pair from open_session, opened beforehand (a benchmark
    keeps the opening out of its timing); by default it is opened here.
    """
    model, in_dir, out_dir = Path(model), Path(in_dir), Path(out_dir)
    if image_format not in EXTENSIONS:
        raise UserError(f"--format {image_format}: choose one of {', '.join(EXTENSIONS)}")
    if list_only:
        return make_listing(model, in_dir, out_dir, image_format, follow_symlinks)
    _check_args(model, in_dir, out_dir, num_shards, shard_index, quality, size, batch_size, workers)
    cores = usable_cores()
    if provider == "tensorrt" and device == "cpu":
        raise UserError("--provider tensorrt runs on a GPU: use it with --device cuda or auto")
    # One intra-op thread per session run; on CPU, `cores` runs side by side (see _Pipeline).
    session, used = session or open_session(
        model, device, allow_cpu_fallback, provider, threads=1, cache_dir=out_dir / ".trt-cache", varied_shapes=native
    )
    trained = session.get_modelmeta().custom_metadata_map.get("image_size", "")
    if not native and not size:
        if not trained.isdigit():
            raise UserError(f"{model} does not say its image size; pass --size or --native")
        size = int(trained)
    workers = workers or cores

    started = time.perf_counter()
    entries = shard_entries(in_dir, out_dir, EXTENSIONS[image_format], follow_symlinks, num_shards, shard_index)
    skipped = [{"path": e.rel, "reason": e.reason} for e in entries if e.reason]
    ignored = sum(e.ignored for e in entries)
    candidates = [e for e in entries if e.out]
    todo = [e for e in candidates if not (out_dir / e.out).exists()]
    already_done = len(candidates) - len(todo)
    out_dir.mkdir(parents=True, exist_ok=True)

    on_cpu = used == "CPUExecutionProvider"
    # CPU: each core runs its own small batch, whose activations stay in that core's cache
    # (bench/generate.py: batch 2 gave 80-91 img/s on 2 cores, batch 8 72). A GPU wants big batches.
    batch_size = batch_size or (CPU_BATCH if on_cpu else GPU_BATCH)
    run = _Pipeline(
        Runner(session, None if on_cpu else "cuda"),
        cores if on_cpu else 1,
        batch_size,
        workers,
        size=size,
        max_side=max_side,
        restore=restore_size,
        fmt=image_format,
        quality=quality,
    )
    written, batches = run(todo, in_dir, out_dir, skipped)
    wall = time.perf_counter() - started
    report = {
        "model": str(model),
        "in_dir": str(in_dir),
        "out_dir": str(out_dir),
        "shard_index": shard_index,
        "num_shards": num_shards,
        "device": device,
        "inputs_seen": len(entries),
        "written": written,
        "already_done": already_done,
        "skipped": len(skipped),
        "ignored": ignored,
        "skipped_files": sorted(skipped, key=lambda s: s["path"]),
        "provider": used,
        "size": "native" if native else size,
        "format": image_format,
        "follow_symlinks": follow_symlinks,
        "batches": batches,
        "wall_s": round(wall, 3),
        "img_per_s": round(written / wall, 2) if wall > 0 else 0.0,
    }
    path = write_report(out_dir, report)
    print(
        f"generated {written} images ({already_done} already done, {len(skipped)} skipped, {ignored} ignored) "
        f"in {wall:.1f} s, {report['img_per_s']} img/s on {used}; report: {path}"
    )
    return report


class _Pipeline:
    """decode pool -> in-order window -> batches by shape -> inference streams -> encode/write pool.

    On CPU each stream is a thread calling session.run with one intra-op thread: batches run side
    by side with no barrier between cores, 10-70% faster here than one run on all cores (a
    shared core stalls every barrier). Every stage is bounded, so memory is too."""

    def __init__(
        self,
        runner: Runner,
        streams: int,
        batch_size: int,
        workers: int,
        *,
        size: int,
        max_side: int,
        restore: bool,
        fmt: str,
        quality: int,
    ) -> None:
        self.runner, self.streams, self.batch_size, self.workers = runner, streams, batch_size, workers
        self.size, self.max_side, self.restore, self.fmt, self.quality = size, max_side, restore, fmt, quality
        self.limit = 2 * batch_size + workers  # images waiting per stage

    def __call__(self, todo: list[Entry], in_dir: Path, out_dir: Path, skipped: list[dict]) -> tuple[int, int]:
        pending: dict[tuple, list] = {}  # shape -> [(entry, pixels, original)], native sizes batch apart
        window: deque[tuple[Entry, Future]] = deque()
        running: deque[Future] = deque()  # inference batches, each returning its write futures
        writes: deque[Future] = deque()
        batches = written = 0
        # A bar on a terminal; in a batch job, a plain line every ARTSCALE_PROGRESS_S seconds.
        bar, lock = Progress(len(todo), "generate"), threading.Lock()

        def tick(_: object = None) -> None:  # encode threads finish images side by side
            with lock:
                bar.update()

        source = iter(todo)
        with (
            ThreadPoolExecutor(self.workers, "decode") as decoders,
            ThreadPoolExecutor(self.streams, "infer") as streams,
            ThreadPoolExecutor(self.workers, "encode") as encoders,
        ):

            def refill() -> None:
                while len(window) < self.limit and (entry := next(source, None)) is not None:
                    window.append((entry, decoders.submit(_decode, in_dir / entry.rel, self.size, self.max_side)))

            def infer(group: list) -> list[Future]:
                outputs = self.runner(np.stack([pixels for _, pixels, _ in group]))
                futures = []
                for (entry, _, original), pixels in zip(group, outputs):
                    futures.append(
                        encoders.submit(
                            _write,
                            out_dir / entry.out,
                            pixels,
                            original if self.restore else None,
                            self.fmt,
                            self.quality,
                        )
                    )
                    futures[-1].add_done_callback(tick)
                return futures

            def settle(keep_running: int) -> None:
                while len(running) > keep_running:
                    writes.extend(running.popleft().result())
                while len(writes) > self.limit:
                    writes.popleft().result()  # re-raises a failed write: that fails the run

            def flush(shape: tuple) -> None:
                nonlocal batches, written
                group = pending.pop(shape)
                running.append(streams.submit(infer, group))
                batches, written = batches + 1, written + len(group)
                settle(self.streams)

            refill()
            while window:
                entry, future = window.popleft()
                try:
                    pixels, original = future.result()
                except Exception as e:  # SkipImage, or a Pillow error images.py did not foresee: counted, never fatal
                    reason = (
                        str(e) if isinstance(e, SkipImage) else f"decoder error: {type(e).__name__}: {str(e)[:160]}"
                    )
                    skipped.append({"path": entry.rel, "reason": reason})
                    tick()
                    refill()
                    continue
                refill()
                group = pending.setdefault(pixels.shape, [])
                group.append((entry, pixels, original))
                if len(group) >= self.batch_size or len(group) * pixels.shape[0] * pixels.shape[1] >= MAX_BATCH_PIXELS:
                    flush(pixels.shape)
                elif sum(map(len, pending.values())) > self.limit:
                    flush(max(pending, key=lambda s: len(pending[s])))
            for shape in list(pending):
                flush(shape)
            settle(0)
            for future in writes:
                future.result()
        bar.close()
        return written, batches

"""Bulk generation: an exported model over a directory tree, mirrored into OUT_DIR.

decode threads (images.py, `draft()` for JPEGs) -> a bounded window -> batches of equal size
through one onnxruntime session -> encode/write threads. Pillow and onnxruntime release the GIL,
so plain threads overlap on real cores. Each output is written under a temporary name and
renamed; a rerun skips outputs that exist. No torch here: workers start in well under a second.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from artscale.core.atomic import refuse_linked_folders
from artscale.core.errors import UserError
from artscale.core.progress import Progress
from artscale.core.system import multiple_of_8, usable_cores
from artscale.data.images import SkipImage, load_image, resize_image
from artscale.data.listing import LISTING, InputFile, list_inputs, read_listing, shard_of, write_listing
from artscale.infer.outputs import EXTENSIONS, done, write_image, write_report
from artscale.infer.session import (
    BYTES_PER_PIXEL,
    GPU_STREAMS,
    Runner,
    batch_limit,
    gpu_budget,
    is_denoiser,
    open_session,
    placement,
)


def native_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """An image's own size, scaled down to fit max_side, each side rounded to a multiple of 8."""
    scale = min(1.0, max_side / max(size))
    return tuple(max(8, int(side * scale / 8 + 0.5) * 8) for side in size)  # type: ignore[return-value]


def _decode(path: Path, size: int, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    if size:
        im, original = load_image(path, (size, size))
    else:
        im, original = load_image(path)
        target = native_size(original, max_side)
        if im.size != target:
            im = resize_image(im, target)
    return np.asarray(im), original


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
) -> list[InputFile]:
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
    variation: dict | None = None,
) -> dict:
    """Run MODEL over this shard of IN_DIR into OUT_DIR; returns the report (also written as JSON).

    A diffusion denoiser makes img2img variations instead (sample.Variations: `variation` holds
    its strength, class, steps, sampler, guidance and seed).

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
    given = session is not None
    session, used = session or open_session(
        model, device, allow_cpu_fallback, provider, threads=1, cache_dir=out_dir / ".trt-cache", varied_shapes=native
    )
    trained = session.get_modelmeta().custom_metadata_map.get("image_size", "")
    on_gpu = used != "CPUExecutionProvider"
    runner = Runner(session, "cuda" if on_gpu else None)
    per_pixel = BYTES_PER_PIXEL
    diffusion = is_denoiser(session)
    if diffusion:
        from artscale.contracts.onnx import read_metadata
        from artscale.infer.img2img import Variations
        from artscale.infer.sample import open_denoiser

        trained = str(read_metadata(session, model)["image_size"])  # the whole metadata checked, before any work
        if native or size not in (0, int(trained)):
            raise UserError(f"{model} is a diffusion denoiser: it runs at its training size, {trained} px only")
        stream = None
        if on_gpu and not given and _torch_cuda():  # open it again on a torch stream: the loop stays on the GPU
            runner = session = None  # one copy of the weights on the GPU at a time
            session, used, stream = open_denoiser(model, device, allow_cpu_fallback, provider, out_dir / ".trt-cache")
            on_gpu = used != "CPUExecutionProvider"
        cuda = "cuda" if used == "CUDAExecutionProvider" else None
        runner = Variations(session, device=cuda, stream=stream, model=model, **(variation or {}))
        per_pixel = runner.bytes_per_pixel
    elif variation:
        raise UserError(f"--{'/--'.join(variation)}: for a diffusion model; {model} is not one (see `artscale info`)")
    if not native and not size:
        if not trained.isdigit():
            raise UserError(f"{model} does not say its image size; pass --size or --native")
        size = int(trained)
    workers = workers or cores

    started = time.perf_counter()
    entries = shard_entries(in_dir, out_dir, EXTENSIONS[image_format], follow_symlinks, num_shards, shard_index)
    if diffusion:  # --class-from-parent: a folder that names no class is skipped
        entries = [replace(e, out="", reason=r) if e.out and (r := runner.skip_reason(e.rel)) else e for e in entries]
    skipped = [{"path": e.rel, "reason": e.reason} for e in entries if e.reason]
    ignored = sum(e.ignored for e in entries)
    candidates = [e for e in entries if e.out]
    refuse_linked_folders(out_dir, [e.out for e in candidates])
    todo = [e for e, there in zip(candidates, done(out_dir, [e.out for e in candidates])) if not there]
    already_done = len(candidates) - len(todo)
    out_dir.mkdir(parents=True, exist_ok=True)

    # CPU: each core runs its own small batch, whose activations stay in that core's cache
    # (bench/generate.py compares batch sizes). A GPU wants big
    # batches, sized by the memory free once the session is open, two in flight.
    budget = gpu_budget() if on_gpu and not batch_size else 0

    def limit(shape: tuple) -> int:
        return batch_limit(
            shape[0], shape[1], on_gpu=on_gpu, requested=batch_size, budget=budget, bytes_per_pixel=per_pixel
        )

    run = _Pipeline(
        runner,
        GPU_STREAMS if on_gpu else cores,
        limit,
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
        "nodes_by_provider": placement(session),
        "size": "native" if native else size,
        "format": image_format,
        "follow_symlinks": follow_symlinks,
        "batches": batches,
        "wall_s": round(wall, 3),
        "img_per_s": round(written / wall, 2) if wall > 0 else 0.0,
        **({"variation": runner.settings} if diffusion else {}),
    }
    path = write_report(out_dir, report)
    print(
        f"generated {written} images ({already_done} already done, {len(skipped)} skipped, {ignored} ignored) "
        f"in {wall:.1f} s, {report['img_per_s']} img/s on {used}; report: {path}"
    )
    return report


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _Pipeline:
    """decode pool -> in-order window -> batches by shape -> inference streams -> encode/write pool.

    On CPU each stream is a thread calling session.run with one intra-op thread: batches run side
    by side with no barrier between cores, 10-70% faster here than one run on all cores (a
    shared core stalls every barrier). Every stage is bounded, so memory is too."""

    def __init__(
        self,
        runner: Runner,
        streams: int,
        limit: Callable[[tuple], int],
        workers: int,
        *,
        size: int,
        max_side: int,
        restore: bool,
        fmt: str,
        quality: int,
    ) -> None:
        self.runner, self.streams, self.batch_limit, self.workers = runner, streams, limit, workers
        self.size, self.max_side, self.restore, self.fmt, self.quality = size, max_side, restore, fmt, quality
        side = size or 8  # --native: sized for the smallest image, the largest batch
        # images waiting per stage: every stream's batch, one more filling, and the workers' own
        self.limit = (streams + 1) * limit((side, side)) + workers

    def __call__(self, todo: list[InputFile], in_dir: Path, out_dir: Path, skipped: list[dict]) -> tuple[int, int]:
        pending: dict[tuple, list] = {}  # shape -> [(entry, pixels, original)], native sizes batch apart
        window: deque[tuple[InputFile, Future]] = deque()
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
                outputs = self.runner(np.stack([pixels for _, pixels, _ in group]), [entry for entry, _, _ in group])
                futures = []
                for (entry, _, original), pixels in zip(group, outputs):
                    futures.append(
                        encoders.submit(
                            write_image,
                            out_dir,
                            entry.out,
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
                if len(group) >= self.batch_limit(pixels.shape):
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

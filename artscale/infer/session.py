"""This module opens the onnxruntime sessions of generation and sampling and runs batches through them.

A session is opened on the device asked for and warmed up, a batch runs through IO binding on a GPU,
and the module says how many images go in one run.

No torch here: an array task starts in well under a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from artscale.contracts.onnx import DENOISER_INPUTS, GPU_PROVIDERS, IMAGE_INPUT, IMAGE_OUTPUT, cuda_options
from artscale.core.errors import UserError
from artscale.core.system import onnxruntime

# What a run of the article's model holds per pixel, from the CPU provider's memory for a large batch;
# tests/infer/test_gpu.py checks it against what a CUDA run holds.
BYTES_PER_PIXEL = 560
# A denoiser run holds this much per pixel of a row, per channel of the UNet's first level (above what
# the CPU provider holds: convolutions on a GPU add their workspace; tests/infer/test_gpu.py checks it on CUDA).
DENOISER_BYTES_PER_PIXEL_CHANNEL = 96
# CPU: large --native images go in smaller batches, so memory stays near 0.3 GB per inference
# stream and a batch's activations stay in the core's cache.
MAX_BATCH_PIXELS = 8 * 256 * 256
CPU_BATCH = 2  # generate: default images per session run on CPU (--batch-size 0; sample has its CPU_CHUNK)
# GPU: batches sized by memory, up to this many images (beyond it a GPU gains little).
GPU_MAX_BATCH = 64
GPU_STREAMS = 2  # batches in flight on a GPU: one computes while the other's copies run
# Of the memory free once the session is open (weights loaded), what the batches in flight may hold
# together; the rest is slack for the arena's fragmentation and other processes' growth.
GPU_MEMORY_USE = 0.8
ASSUMED_GPU_FREE = 8 << 30  # when the driver cannot say


class GpuMemory(NamedTuple):
    free: int
    total: int


def gpu_memory() -> GpuMemory | None:
    """Free and total bytes of the first visible GPU, asked of the CUDA driver itself (no torch, no
    nvidia-smi), so CUDA_VISIBLE_DEVICES is honoured, a MIG instance's UUID included. It uses the
    device's primary context, the one onnxruntime and torch share: once a session is open it creates
    nothing. None where there is no driver or no device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, context = ctypes.c_int(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0):
        return None
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
        return None
    try:
        if cuda.cuCtxPushCurrent_v2(context):
            return None
        status = cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(device)
    return GpuMemory(free.value, total.value) if status == 0 else None


def gpu_budget() -> int:
    """Bytes the batches in flight may hold together on the GPU: a share of what is free now."""
    memory = gpu_memory()
    return int((memory.free if memory else ASSUMED_GPU_FREE) * GPU_MEMORY_USE)


def batch_limit(
    height: int,
    width: int,
    *,
    on_gpu: bool,
    requested: int = 0,
    budget: int = 0,
    bytes_per_pixel: int = BYTES_PER_PIXEL,
    streams: int = GPU_STREAMS,
) -> int:
    """Images per session run for images of height x width.

    CPU: --batch-size (default 2), capped at MAX_BATCH_PIXELS. GPU: --batch-size as given; by
    default as many as fit when `streams` batches share `budget` bytes (gpu_budget), at most
    GPU_MAX_BATCH. `bytes_per_pixel` is what a run holds per pixel of an image."""
    pixels = height * width
    if not on_gpu:
        return max(1, min(requested or CPU_BATCH, -(-MAX_BATCH_PIXELS // pixels)))
    if requested:
        return requested
    fit = (budget or int(ASSUMED_GPU_FREE * GPU_MEMORY_USE)) // (streams * bytes_per_pixel * pixels)
    return max(1, min(GPU_MAX_BATCH, fit))


def denoiser_bytes_per_pixel(first_channels: int, rows_per_image: int = 1) -> int:
    """What a denoiser run holds per pixel of an image (`rows_per_image` 2 with guidance: cond and uncond)."""
    return DENOISER_BYTES_PER_PIXEL_CHANNEL * first_channels * rows_per_image


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _cuda_hint() -> str:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver here (libcuda.so.1 not found)"
    return "CUDA 13 / cuDNN 9 libraries missing or no usable GPU"


def is_denoiser(session) -> bool:
    """A diffusion denoiser (`sample`, `timestep`, `class_labels` -> `prediction`; see `artscale export`)."""
    return [i.name for i in session.get_inputs()] == list(DENOISER_INPUTS)


def check_signature(session, model: Path) -> None:
    """An artscale model takes uint8 [N, H, W, 3] named `images`, or is a diffusion denoiser (see `artscale export`)."""
    if is_denoiser(session):
        return
    inp = session.get_inputs()[0]
    if inp.name != IMAGE_INPUT or inp.type != "tensor(uint8)" or len(inp.shape) != 4:
        raise UserError(
            f"{model} is not an artscale model (expected input {IMAGE_INPUT}: uint8 [N, H, W, 3]; see `artscale export`)"
        )


def warm_up(session, device: str | None) -> None:
    """One 8 x 8 image through the session, the way batches will go: a library that cannot run
    (cuDNN, cuBLAS) fails here, and the first real batch does not pay for the start."""
    if is_denoiser(session):  # H and W are fixed at the training size
        side = session.get_inputs()[0].shape[2]
        x, t, labels = np.zeros((1, 3, side, side), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64)
        session.run(None, dict(zip(DENOISER_INPUTS, (x, t, labels))))
        return
    Runner(session, device)(np.zeros((1, 8, 8, 3), np.uint8))


def open_session(
    model: Path,
    device: str,
    allow_cpu_fallback: bool,
    provider: str,
    threads: int,
    cache_dir: Path | None = None,
    varied_shapes: bool = False,
    stream: int = 0,
):
    """An onnxruntime session on the device asked for, warmed up; returns (session, provider used).

    `stream`: a CUDA stream (torch's `Stream.cuda_stream`) for onnxruntime to compute on, so that
    torch's work and onnxruntime's are ordered on one stream, with no host synchronisation.

    onnxruntime quietly runs on CPU when CUDA cannot start, so `cuda` is checked: the CPU fallback
    is disabled in the session, and `get_providers()` is read back after creation. A broken cuDNN
    or CUDA library only shows when the session first runs, so a tiny batch runs here, inside
    these checks: its failure is one line with onnxruntime's own words, not a traceback later in
    a worker thread.
    """
    ort = onnxruntime()

    ort.set_default_logger_severity(4)  # its C++ lines about missing libraries: we say it in one line

    def options(strict: bool):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Decode/encode threads share these cores: idle onnxruntime workers must sleep, not spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if strict:
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")  # see placement()
        return opts

    def cpu_session():
        try:
            session = ort.InferenceSession(str(model), options(False), providers=["CPUExecutionProvider"])
        except Exception as e:  # InvalidProtobuf, NoSuchFile, Fail: not a usable model
            raise UserError(f"cannot load {model} as an ONNX model: {_first_line(e)}") from None
        check_signature(session, model)
        try:
            warm_up(session, None)
        except Exception as e:  # onnxruntime's own words: the model fails when it runs
            raise UserError(f"{model} fails on a tiny batch on CPU: onnxruntime: {_first_line(e)}") from None
        return session

    if device == "cpu":
        return cpu_session(), "CPUExecutionProvider"
    available = ort.get_available_providers()
    wanted: list = [("CUDAExecutionProvider", cuda_options(varied_shapes, stream))]
    if provider == "tensorrt":  # engines are built per input shape: cache them beside the outputs
        trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir or ".")}
        wanted.insert(
            0, ("TensorrtExecutionProvider", {**trt, **({"user_compute_stream": str(stream)} if stream else {})})
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
                problem = _first_line(e)
                continue
            used = session.get_providers()[0]
            if used in GPU_PROVIDERS:
                check_signature(session, model)
                try:
                    warm_up(session, "cuda")
                except Exception as e:  # e.g. CUDNN_STATUS_..., a missing libcublas: the GPU cannot run it
                    problem = _first_line(e)
                    continue
                if provider == "tensorrt" and used != "TensorrtExecutionProvider":
                    print(
                        f"artscale: TensorRT did not start (TensorRT libraries missing?); running on {used}",
                        file=sys.stderr,
                    )
                line = cpu_nodes_line(cpu_nodes(session), sum(placement(session).values()), used)
                if line:
                    print(f"artscale: {line}", file=sys.stderr)
                return session, used
            problem = f"onnxruntime chose {used}"
    session = cpu_session()
    why = problem if problem.startswith("this onnxruntime") else _cuda_hint()
    if problem and not problem.startswith("this onnxruntime"):
        why += f"; onnxruntime: {problem}"
    if device == "cuda" and not allow_cpu_fallback:
        raise UserError(f"--device cuda: CUDA does not run here ({why}); use --device cpu, or add --allow-cpu-fallback")
    print(f"artscale: --device {device}: CUDA does not run here ({why}); running on CPU", file=sys.stderr)
    return session, "CPUExecutionProvider"


def _assigned(session) -> list[tuple[str, str, str]]:
    """(provider, node name, op type) of every node, as onnxruntime placed them; [] when not recorded."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # an older onnxruntime, or a session opened without the recording entry
        return []
    return [(sub.ep_name, node.name, node.op_type) for sub in subgraphs for node in sub.get_nodes()]


def placement(session) -> dict[str, int]:
    """Nodes per execution provider ({} when onnxruntime did not record it): report.json's count."""
    return dict(Counter(provider for provider, _, _ in _assigned(session)))


def cpu_nodes(session) -> list[tuple[str, str]]:
    """(name, op type) of the nodes placed on the CPU provider."""
    return [(name, op) for provider, name, op in _assigned(session) if provider == "CPUExecutionProvider"]


def cpu_nodes_line(nodes: list[tuple[str, str]], total: int, used: str) -> str:
    """One line naming the nodes a GPU session runs on the CPU ("" for none, or for a CPU session).

    Each moves its tensors across to the host and back on every run: onnxruntime puts shape
    arithmetic there on purpose (cheap), a convolution there would be a problem."""
    if used == "CPUExecutionProvider" or not nodes:
        return ""
    ops = Counter(op for _, op in nodes)
    listed = ", ".join(f"{op} x{n}" for op, n in ops.most_common(8)) + (", ..." if len(ops) > 8 else "")
    names = ", ".join(name for name, _ in nodes[:3])
    return f"{len(nodes)} of {total} nodes run on the CPU beside {used}: {listed} (e.g. {names})"


class Runner:
    """session.run for one batch. On a GPU (device "cuda") through IO binding: the input is
    copied from host memory, the output is bound on the device and copied back once the run is
    done. Callable from several threads at once (one binding per thread), so two batches can be
    in flight: one computes while the other's copies run."""

    def __init__(self, session, device: str | None) -> None:
        self.session, self.device = session, device
        self.local = threading.local()

    def __call__(self, batch: np.ndarray, entries: list | None = None) -> np.ndarray:
        if self.device is None:
            return self.session.run([IMAGE_OUTPUT], {IMAGE_INPUT: batch})[0]
        binding = getattr(self.local, "binding", None)
        if binding is None:
            binding = self.local.binding = self.session.io_binding()
        binding.bind_cpu_input(IMAGE_INPUT, np.ascontiguousarray(batch))
        binding.bind_output(IMAGE_OUTPUT, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

"""This module is what both ONNX exporters share, so each holds only its own graph.

The parity images, the onnxruntime sessions the gate runs on, the gate itself, the metadata written
into the model, the atomic write and the report."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from artscale import __version__
from artscale.core.atomic import write_atomic
from artscale.core.errors import UserError
from artscale.core.system import onnxruntime
from artscale.data.loader import SkipCounter, shard_images
from artscale.data.manifest import is_shards_dir, read_manifest, shard_file, split_shards
from artscale.data.shard_writer import sha256_file

OPSET = 17
PARITY_IMAGES = 8
CPU = "CPUExecutionProvider"
REPORTED = ("step", "image_size", "source", "source_sha256", "precision")  # metadata in every report


def _generated_images(size: int, count: int) -> list[np.ndarray]:
    """Structured images (gradients, blocks, noise) when there are no val shards to use."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(count):
        arr = np.stack(
            [xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), (xx + yy) * 127 // max(size - 1, 1)], -1
        )
        arr = (arr + rng.integers(0, 255, 3)) % 256
        y0, x0 = rng.integers(0, size // 2, 2)
        arr[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.integers(0, 255, 3)
        arr = arr + rng.integers(-12, 13, arr.shape)
        images.append(np.clip(arr, 0, 255).astype(np.uint8))
    return images


def parity_images(shards: Path | None, config: dict[str, Any] | None, size: int) -> tuple[np.ndarray, str]:
    if shards is not None and not is_shards_dir(shards):
        raise UserError(f"--shards {shards}: no manifest.json there (expected a dir written by `artscale pack`)")
    if shards is None and config and config.get("data"):
        candidate = Path(config["data"])
        shards = candidate if is_shards_dir(candidate) else None
    manifest = read_manifest(shards) if shards is not None else None
    if manifest is not None and manifest["image_size"] == size:  # other sizes: none would fit the graph's
        urls = [str(shard_file(shards, s)) for s in split_shards(manifest, "val")]
        counter = SkipCounter()
        found = [image for image, _ in itertools.islice(shard_images(urls, counter, size=size), PARITY_IMAGES)]
        if found:
            skipped = f" (skipped {counter.count} unreadable)" if counter.count else ""
            return np.stack(found), f"{len(found)} val images from {shards}{skipped}"
    return np.stack(_generated_images(size, PARITY_IMAGES)), f"{PARITY_IMAGES} generated images"


def parity_session(model_bytes: bytes, providers: list | None = None):
    ort = onnxruntime()

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=providers or [CPU])


def parity_sessions(model_bytes: bytes, quiet: bool = False) -> list[tuple[str, Any]]:
    """(provider, session) pairs the parity gate runs on: the CPU provider, and the CUDA provider
    (with generation's options) where CUDA really runs here. The CPU computes most fp16 ops in fp32,
    so an fp16 graph passing there says little about the GPU it is meant for."""
    ort = onnxruntime()

    from artscale.contracts.onnx import cuda_devices, cuda_options

    sessions = [(CPU, parity_session(model_bytes))]
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not cuda_devices():
        return sessions
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, as generate does
    why = ""
    try:
        cuda = parity_session(model_bytes, [("CUDAExecutionProvider", cuda_options()), CPU])
        if cuda.get_providers()[0] == "CUDAExecutionProvider":
            return [*sessions, ("CUDAExecutionProvider", cuda)]
    except Exception as e:  # a CUDA or cuDNN library that cannot load
        why = f": {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else ""
    if not quiet:
        print(f"artscale: a GPU is here but the CUDA provider does not open{why}; parity checked on the CPU only")
    return sessions


def provider_tolerance(provider: str, fp32: Any, fp16: Any, is_fp16: bool) -> Any:
    """The gate's tolerance on `provider`. The CUDA provider runs fp32 convolutions in TF32 on Ampere and
    newer (its default, as torch's for convolutions): fp16's 10-bit mantissa, so fp16's tolerance."""
    return fp16 if is_fp16 or provider != CPU else fp32


def gate(measured: dict[str, float], limits: dict[str, float], what: str) -> None:
    """Refuse the export where a figure `measured` holds is over its limit (NaN, an fp16 overflow, never passes)."""
    limits = {k: v for k, v in limits.items() if k in measured}
    if not all(measured[k] <= v for k, v in limits.items()):
        figures = ", ".join(f"{k.replace('_', ' ')} {measured[k]:.3g} (allowed {v:g})" for k, v in limits.items())
        raise UserError(f"parity gate failed on {what}: {figures}; nothing written")


def gate_providers(
    model_bytes: bytes,
    measure: Callable[[Any], dict[str, Any]],
    limits: Callable[[str], dict[str, float]],
    what: str,
    quiet: bool = False,
) -> dict[str, tuple[dict[str, Any], dict[str, float]]]:
    """`measure(session)` on every parity session, held to `limits(provider)` ({figure: the most allowed}):
    {provider: (figures, limits)}, the CPU's first; a figure over its limit refuses the export."""
    found = {}
    for provider, session in parity_sessions(model_bytes, quiet):
        measured, allowed = measure(session), limits(provider)
        gate(measured, allowed, f"{what} ({provider})")
        found[provider] = measured, allowed
    return found


def on_other_providers(by_provider: dict[str, dict], brief: Callable[[dict], str]) -> str:
    """What the gate measured beyond the CPU's provider, for the export's last line ("" on the CPU only)."""
    return "".join(f"; on {p}: {brief(m)}" for p, m in by_provider.items() if p != CPU)


def metadata(
    extra: dict[str, str],
    *,
    step: int | None,
    image_size: int,
    source: Path,
    fp16: bool,
    config: dict[str, Any] | None,
    parity: dict[str, Any],
) -> dict[str, str]:
    """The model's metadata: what both exporters record, with the exporter's own keys (`extra`) after the version."""
    return {
        "artscale_version": __version__,
        **extra,
        "step": "" if step is None else str(step),
        "image_size": str(image_size),
        "source": str(source),
        "source_sha256": sha256_file(source),
        "precision": "fp16" if fp16 else "fp32",
        "config": json.dumps(config or {}, sort_keys=True),
        "parity": json.dumps(parity),
    }


def seal(proto: onnx.ModelProto, meta: dict[str, str]) -> bytes:
    """`meta` into the model, then onnx's full check: the bytes to write."""
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "artscale", __version__
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def publish(out: Path, data: bytes, meta: dict[str, str], keys: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """Write `data` to OUT atomically (a full disk or a read-only place: one line, nothing half-written
    stays); the export's report: where, how many bytes, the metadata's `keys`, and `extra`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, data)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return {"path": str(out), "bytes": len(data), **{k: meta[k] for k in keys}, **extra}

"""A checkpoint to ONNX (uint8 NHWC in and out), written only when it matches PyTorch.

The graph holds everything between file bytes and file bytes: ImageNet normalisation, the model
in eval mode, sigmoid, x255 and rounding. It is exported with two outputs, `generated` (uint8)
and `probabilities` (the float sigmoid), so the parity gate can compare floats too; the float
output is then dropped and the final bytes are checked once more before the atomic rename.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from artscale import __version__
from artscale.atomic import write_atomic
from artscale.checkpoint import load_model
from artscale.errors import UserError
from artscale.manifest import is_shards_dir, read_manifest, split_shards
from artscale.model import IMAGENET_MEAN, IMAGENET_STD, check_size
from artscale.progress import Progress
from artscale.shard_writer import sha256_file

INPUT, OUTPUT, FLOAT_OUTPUT = "images", "generated", "probabilities"
OPSET = 17
ARTICLE_SIZE = 128  # the article trains at 128 px; an article .pth says nothing about its size
# (float tolerance on the [0, 1] output, uint8 tolerance in levels)
FP32_TOLERANCE = (1e-4, 1)
FP16_TOLERANCE = (1e-2, 3)  # half precision: ~3 significant digits through 6 conv layers
PARITY_IMAGES = 8


class Uint8Model(nn.Module):
    """uint8 [N, H, W, 3] RGB -> (uint8 [N, H, W, 3], float [N, H, W, 3]); the ONNX contract."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one Sub and one Div in the graph.
        self.register_buffer("shift", torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1) * 255)
        self.register_buffer("scale", torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(self.dtype)
        y = self.model((x - self.shift) / self.scale)
        generated = torch.round(y * 255).clamp(0, 255).to(torch.uint8)
        return generated.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)


def _val_images(shards: Path, size: int, limit: int) -> list[np.ndarray]:
    """Up to `limit` decoded val images of a shards dir (manifest.json from `artscale pack`)."""
    from artscale.images import decode_bytes

    names = [s["name"] for s in split_shards(read_manifest(shards), "val")]
    found: list[np.ndarray] = []
    for name in names:
        try:
            with tarfile.open(shards / name) as tar:
                for member in tar:
                    if len(found) >= limit:
                        return found
                    if not member.isfile() or member.name.rsplit(".", 1)[-1] not in ("jpg", "png"):
                        continue
                    arr = np.asarray(decode_bytes(tar.extractfile(member).read()))
                    if arr.shape[:2] == (size, size):
                        found.append(arr)
        except (OSError, tarfile.TarError) as e:
            raise UserError(f"cannot read val shard {shards / name}: {e}") from None
    return found


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


def _parity_images(shards: Path | None, config: dict[str, Any] | None, size: int) -> tuple[np.ndarray, str]:
    if shards is not None and not is_shards_dir(shards):
        raise UserError(f"--shards {shards}: no manifest.json there (expected a dir written by `artscale pack`)")
    if shards is None and config and config.get("data"):
        candidate = Path(config["data"])
        shards = candidate if is_shards_dir(candidate) else None
    if shards is not None:
        found = _val_images(shards, size, PARITY_IMAGES)
        if found:
            return np.stack(found), f"{len(found)} val images from {shards}"
    return np.stack(_generated_images(size, PARITY_IMAGES)), f"{PARITY_IMAGES} generated images"


def _torch_reference(model: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        generated, probs = Uint8Model(model)(torch.from_numpy(images))
    return generated.numpy(), probs.numpy()


def _session(model_bytes: bytes, providers: list | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=providers or ["CPUExecutionProvider"])


def parity_sessions(model_bytes: bytes, quiet: bool = False) -> list[tuple[str, Any]]:
    """(provider, session) pairs the parity gate runs on: the CPU provider, and the CUDA provider
    (with generation's options) where CUDA really runs here. The CPU computes most fp16 ops in fp32,
    so an fp16 graph passing there says little about the GPU it is meant for."""
    import onnxruntime as ort

    from artscale.session import cuda_devices, cuda_options

    sessions = [("CPUExecutionProvider", _session(model_bytes))]
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not cuda_devices():
        return sessions
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, as generate does
    why = ""
    try:
        cuda = _session(model_bytes, [("CUDAExecutionProvider", cuda_options()), "CPUExecutionProvider"])
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
    return fp16 if is_fp16 or provider != "CPUExecutionProvider" else fp32


def _compare(session, model: nn.Module, images: np.ndarray, float_output: bool) -> dict[str, float]:
    want_u8, want_f = _torch_reference(model, images)
    outputs = session.run(None, {INPUT: images})
    got_u8 = outputs[0]
    if got_u8.shape != want_u8.shape or got_u8.dtype != np.uint8:
        raise UserError(
            f"parity gate failed: ONNX output {got_u8.dtype}{list(got_u8.shape)}, expected uint8{list(want_u8.shape)}"
        )
    result = {"max_uint8_diff": int(np.abs(got_u8.astype(np.int16) - want_u8.astype(np.int16)).max())}
    if float_output:
        diff = np.abs(outputs[1].astype(np.float64) - want_f.astype(np.float64)).max()
        result["max_float_diff"] = float(diff)  # NaN (an fp16 overflow) stays NaN and fails the gate
    return result


def _export_graph(model: nn.Module, size: int, fp16: bool) -> onnx.ModelProto:
    dtype = torch.float16 if fp16 else torch.float32
    wrapper = Uint8Model(copy.deepcopy(model).to(dtype), dtype).eval()
    buf = io.BytesIO()
    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript exporter": chosen on purpose
        torch.onnx.export(
            wrapper,
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,  # the default dynamo exporter needs the onnxscript package
            input_names=[INPUT],
            output_names=[OUTPUT, FLOAT_OUTPUT],
            dynamic_axes={name: {0: "N", 1: "H", 2: "W"} for name in (INPUT, OUTPUT, FLOAT_OUTPUT)},
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _drop_float_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    keep = [o for o in proto.graph.output if o.name != FLOAT_OUTPUT]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    return proto


def _gate(measured: dict[str, float], tolerance: tuple[float, int], what: str) -> None:
    float_tol, u8_tol = tolerance
    diff = measured.get("max_float_diff", 0.0)
    if not diff <= float_tol or measured["max_uint8_diff"] > u8_tol:
        raise UserError(
            f"parity gate failed on {what}: max float diff {diff:.3g} (allowed {float_tol:g}), max uint8 diff "
            f"{measured['max_uint8_diff']} (allowed {u8_tol}); nothing written"
        )


def export_onnx(
    source: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    size: int | None = None,
    shards: str | Path | None = None,
    weights: str | None = None,
) -> dict:
    """Export SOURCE (run dir, checkpoint, article .pth) to OUT, parity-gated; returns what was measured.
    `weights`: ema, raw, or None (the EMA where the run kept one). A diffusion run exports its
    denoiser instead (export_diffusion.py)."""
    from artscale.export_diffusion import export_denoiser, is_diffusion_source

    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"{out}: the output file must end in .onnx")
    if out.is_dir():
        raise UserError(f"{out} is a directory; give the .onnx file to write")
    if is_diffusion_source(source):
        return export_denoiser(source, out, fp16=fp16, shards=shards, weights=weights)
    model, weights = load_model(source, weights=weights)
    config = weights.config
    trained = int(config["image_size"]) if config and config.get("image_size") else None
    image_size = size or trained or ARTICLE_SIZE
    check_size(image_size, image_size)
    if size is None and trained is None:
        print(
            f"{weights.path}: no training config, assuming the article's {ARTICLE_SIZE} px (pass --size to say otherwise)"
        )

    images, parity_source = _parity_images(Path(shards) if shards else None, config, image_size)
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    # export, parity gate, full ONNX check, dynamic-shape gate: minutes for a large model on CPU
    bar = Progress(4, "export", unit="step")
    proto = _export_graph(model, image_size, fp16)
    bar.update()
    by_provider = {}
    for provider, session in parity_sessions(proto.SerializeToString()):
        allowed = provider_tolerance(provider, FP32_TOLERANCE, FP16_TOLERANCE, fp16)
        measured = _compare(session, model, images, float_output=True)
        _gate(measured, allowed, f"{parity_source} ({provider})")
        by_provider[provider] = {**measured, "tolerance": list(allowed)}
    parity = {k: v for k, v in by_provider["CPUExecutionProvider"].items() if k != "tolerance"}
    bar.update()
    # Dynamic shapes: another batch size and a non-square size must work and agree too.
    other = np.ascontiguousarray(np.concatenate([images[:3], images[:3, ::-1]], axis=2)[:, :, : image_size * 2 - 8])
    final = _drop_float_output(proto)
    checked = {"images": parity_source, "tolerance": list(tolerance), "providers": by_provider}
    meta = {
        "artscale_version": __version__,
        "step": "" if weights.step is None else str(weights.step),
        "image_size": str(image_size),
        "source": str(weights.path),
        "source_sha256": sha256_file(weights.path),
        "precision": "fp16" if fp16 else "fp32",
        "config": json.dumps(config or {}, sort_keys=True),
        "parity": json.dumps({**parity, **checked}),
    }
    for key, value in meta.items():
        final.metadata_props.add(key=key, value=value)
    final.producer_name, final.producer_version = "artscale", __version__
    onnx.checker.check_model(final, full_check=True)
    bar.update()
    data = final.SerializeToString()
    for provider, session in parity_sessions(data, quiet=True):
        allowed = provider_tolerance(provider, FP32_TOLERANCE, FP16_TOLERANCE, fp16)
        measured = _compare(session, model, other, float_output=False)
        shape = f"{other.shape[0]} images of {other.shape[1]}x{other.shape[2]}"
        _gate(measured, allowed, f"{shape} (dynamic shape, {provider})")
        if provider == "CPUExecutionProvider":
            dynamic = measured
    bar.update()
    bar.close()

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, data, tmp=out.with_name(f".{out.name}.tmp-{os.getpid()}"))
    except OSError as e:  # a full disk or a read-only place: nothing half-written stays
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    report = {
        "path": str(out),
        "bytes": len(data),
        **{k: meta[k] for k in ("step", "image_size", "source", "source_sha256", "precision")},
        "parity": {**parity, **checked},
        "dynamic_parity": dynamic,
    }
    also = "".join(
        f"; on {p}: {m['max_float_diff']:.2g}, {m['max_uint8_diff']}"
        for p, m in by_provider.items()
        if p != "CPUExecutionProvider"
    )
    print(
        f"exported {out} ({report['precision']}, {image_size} px, step {meta['step'] or '?'}): parity on {parity_source}: "
        f"max float diff {parity['max_float_diff']:.2g}, max uint8 diff {parity['max_uint8_diff']}{also}"
    )
    return report


def describe_onnx(path: str | Path) -> str:
    """What `artscale info MODEL.onnx` prints: the I/O signature and artscale's metadata."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise UserError(
            f"{path} is not an ONNX model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None

    def signature(values) -> str:
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
            rows.append(f"  {v.name}: {onnx.TensorProto.DataType.Name(t.elem_type).lower()} [{', '.join(dims)}]")
        return "\n".join(rows)

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "?")
    lines = [
        f"{path}: ONNX model, {path.stat().st_size:,} bytes, opset {opset}, producer {proto.producer_name} {proto.producer_version}",
        "inputs:",
        signature(proto.graph.input),
        "outputs:",
        signature(proto.graph.output),
        "metadata:",
    ]
    lines += [f"  {p.key}: {p.value}" for p in proto.metadata_props] or ["  (none)"]
    return "\n".join(lines)

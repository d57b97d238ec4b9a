"""This module is the contract of the ONNX files artscale writes, read by export and inference alike.

It holds the input and output names, the metadata a sampler reads, what `artscale info` prints,
and the CUDA provider options that export's parity gate and inference share."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import onnx

from artscale.core.errors import UserError

# The article's image->image graph: uint8 NHWC in and out (and a float output export drops after parity).
IMAGE_INPUT, IMAGE_OUTPUT, FLOAT_OUTPUT = "images", "generated", "probabilities"
# The denoiser's graph: one network evaluation.
DENOISER_INPUTS, DENOISER_OUTPUT = ("sample", "timestep", "class_labels"), "prediction"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def read_metadata(session) -> dict[str, Any]:
    """The sampler's view of an exported denoiser: scheduler config, classes, null label, size."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get("objective") != "diffusion":
        raise UserError("this ONNX model is not a diffusion denoiser (export a diffusion run with `artscale export`)")
    return {
        "scheduler": json.loads(props["scheduler"]),
        "classes": json.loads(props["classes"]),
        "null_label": int(props["null_label"]),
        "image_size": int(props["image_size"]),
        "prediction_type": props["prediction_type"],
        "weights": props.get("weights", ""),
        "step": props.get("step", ""),
        "config": json.loads(props.get("config") or "{}"),  # the training config: the UNet's shape
        "sampling": json.loads(props.get("sampling") or "null"),  # the run's sampler, steps, guidance (none: older)
        "distilled": json.loads(props.get("distilled") or "null"),  # a distilled student's record
    }


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
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("objective") == "diffusion":
        try:
            sampling, student = json.loads(props.get("sampling") or "{}"), json.loads(props.get("distilled") or "{}")
        except ValueError:
            sampling, student = {}, {}
        if student:
            lines.append(
                f"distilled student of {student.get('teacher')} (step {student.get('teacher_step')}): "
                f"{student.get('steps')} steps, guidance {student.get('guidance')} baked in, one pass per step"
            )
        elif sampling:
            lines.append(
                f"samples with {sampling.get('sampler')} {sampling.get('steps')} steps, guidance {sampling.get('guidance')}"
            )
    return "\n".join(lines)


def cuda_devices() -> int:
    """CUDA devices the driver shows this process (CUDA_VISIBLE_DEVICES applies); 0 without a driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGetCount(ctypes.byref(count)):
        return 0
    return count.value


def cuda_options(varied_shapes: bool = False, stream: int = 0) -> dict[str, str]:
    """The CUDA provider's options for generation, sampling and export's parity check alike.

    cuDNN's exhaustive algorithm search runs once per input shape: worth it for one size only. The
    arena grows by what a run asks for, not to the next power of two, so the batches sized by
    gpu_budget fit. `stream` (0: onnxruntime's own) is the CUDA stream to compute on."""
    options = {
        "cudnn_conv_algo_search": "HEURISTIC" if varied_shapes else "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
    }
    if stream:
        options["user_compute_stream"] = str(stream)
    return options

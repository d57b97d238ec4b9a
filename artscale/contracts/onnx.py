"""This module is the contract of the ONNX files artscale writes, read by export and inference alike.

It holds the input and output names, the metadata a sampler reads, what `artscale info` prints,
and the CUDA provider options that export's parity gate and inference share."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path
from typing import Any

import onnx

from artscale.contracts.run_files import check_distilled, check_sampler_keys, check_sampling
from artscale.core.checks import MAX_CLASSES, BadFile, class_names, field, mapping, printable
from artscale.core.errors import UserError

# The article's image->image graph: uint8 NHWC in and out (and a float output export drops after parity).
IMAGE_INPUT, IMAGE_OUTPUT, FLOAT_OUTPUT = "images", "generated", "probabilities"
# The denoiser's graph: one network evaluation.
DENOISER_INPUTS, DENOISER_OUTPUT = ("sample", "timestep", "class_labels"), "prediction"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MAX_IMAGE_SIZE = 16384
MAX_TIMESTEPS = 100_000


def _json(props: dict[str, str], key: str, path: str | Path, default: str | None = None) -> Any:
    text = props.get(key, default)
    if text is None:
        raise BadFile(path, f"metadata {key}", "is missing (export the run again with `artscale export`)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadFile(path, f"metadata {key}", f"is not valid JSON ({printable(str(e))[:100]})") from None


def _int(props: dict[str, str], key: str, path: str | Path, low: int, high: int) -> int:
    text = props.get(key)
    if text is None or not text.isascii() or not text.isdigit():
        raise BadFile(path, f"metadata {key}", f"must be a whole number, not {printable(repr(text))[:60]}")
    return field({key: int(text)}, key, int, path, low=low, high=high, where="metadata ")


def _scheduler(value: Any, path: str | Path) -> dict[str, Any]:
    """The fields of the training scheduler's config that the samplers compute with."""
    config = mapping(value, path, "metadata scheduler")
    where = "metadata scheduler."
    field(config, "num_train_timesteps", int, path, low=1, high=MAX_TIMESTEPS, where=where)
    for key in ("beta_start", "beta_end"):
        field(config, key, float, path, low=0, low_open=True, high=1, where=where, default=None)
    for key in ("beta_schedule", "timestep_spacing", "variance_type"):
        field(config, key, (str, type(None)), path, where=where, default=None)
    for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        field(config, key, bool, path, where=where, default=False)
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BadFile(path, f"{where}{key}", f"must be a finite number, not {value}")
    if config.get("trained_betas") is not None:
        raise BadFile(path, f"{where}trained_betas", "must be null (artscale's schedules are computed, not listed)")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise BadFile(path, f"{where}prediction_type", f"must be one of {', '.join(PREDICTION_TYPES)}")
    return config


def read_metadata(session, path: str | Path = "the ONNX model") -> dict[str, Any]:
    """The sampler's view of an exported denoiser: scheduler config, classes, null label, size.

    Every field is checked (types, ranges, class names that are safe folder names): a model is a
    file someone else may have written, and its class names become sample's output folders. A bad
    one is a BadFile naming `path` and the field."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get("objective") != "diffusion":
        raise UserError(f"{path} is not a diffusion denoiser (export a diffusion run with `artscale export`)")
    classes = class_names(_json(props, "classes", path), path, "metadata classes")
    null_label = _int(props, "null_label", path, 0, MAX_CLASSES)
    if null_label != len(classes):
        raise BadFile(path, "metadata null_label", f"must be {len(classes)}, the index after the last class")
    size = _int(props, "image_size", path, 8, MAX_IMAGE_SIZE)
    if size % 8:
        raise BadFile(path, "metadata image_size", f"must be a multiple of 8, not {size}")
    prediction = props.get("prediction_type")
    if prediction not in PREDICTION_TYPES:
        raise BadFile(path, "metadata prediction_type", f"must be one of {', '.join(PREDICTION_TYPES)}")
    config = mapping(_json(props, "config", path, "{}"), path, "metadata config")
    channels = field(config, "block_out_channels", (list, type(None)), path, where="metadata config.", default=None)
    if channels is not None and not all(type(c) is int and 1 <= c <= 65536 for c in channels):
        raise BadFile(path, "metadata config.block_out_channels", "must be a list of whole numbers in 1..65536")
    field(config, "denoiser", str, path, where="metadata config.", default="base")
    check_sampler_keys(config, path, "metadata config.")
    return {
        "scheduler": _scheduler(_json(props, "scheduler", path), path),
        "classes": classes,
        "null_label": null_label,
        "image_size": size,
        "prediction_type": prediction,
        "weights": props.get("weights", ""),
        "step": props.get("step", ""),
        "config": config,  # the training config: the UNet's shape
        # the run's sampler, steps, guidance, and a student's record (None: an older export, or no student)
        "sampling": check_sampling(_json(props, "sampling", path, "null"), path, "metadata sampling"),
        "distilled": check_distilled(_json(props, "distilled", path, "null"), path, "metadata distilled"),
    }


def _sampling_line(props: dict[str, str], path: str | Path) -> str:
    """What the model samples with, checked as read_metadata checks it ("": not recorded, an older export);
    a bad record is named, not shown."""
    try:
        sampling = check_sampling(_json(props, "sampling", path, "null"), path, "metadata sampling")
        student = check_distilled(_json(props, "distilled", path, "null"), path, "metadata distilled")
    except BadFile as e:
        return f"unreadable: {printable(str(e))}"
    if student:
        return (
            f"distilled student of {student['teacher']} (step {student.get('teacher_step')}): "
            f"{student['steps']} steps, guidance {student['guidance']:g} baked in, one pass per step"
        )
    if sampling:
        return f"samples with {sampling['sampler']} {sampling['steps']} steps, guidance {sampling['guidance']:g}"
    return ""


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
            dims = [printable(d.dim_param) or str(d.dim_value) for d in t.shape.dim]
            rows.append(
                f"  {printable(v.name)}: {onnx.TensorProto.DataType.Name(t.elem_type).lower()} [{', '.join(dims)}]"
            )
        return "\n".join(rows)

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "?")
    lines = [
        f"{path}: ONNX model, {path.stat().st_size:,} bytes, opset {opset}, producer {printable(proto.producer_name + ' ' + proto.producer_version)}",
        "inputs:",
        signature(proto.graph.input),
        "outputs:",
        signature(proto.graph.output),
        "metadata:",
    ]
    lines += [f"  {printable(p.key)}: {printable(p.value)}" for p in proto.metadata_props] or ["  (none)"]
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("objective") == "diffusion" and (line := _sampling_line(props, path)):
        lines.append(line)
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

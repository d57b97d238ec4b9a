"""A checkpoint to ONNX (uint8 NHWC in and out), written only when it matches PyTorch.

The graph holds everything between file bytes and file bytes: ImageNet normalisation, the model
in eval mode, sigmoid, x255 and rounding. It is exported with two outputs, `generated` (uint8)
and `probabilities` (the float sigmoid), so the parity gate can compare floats too; the float
output is then dropped and the final bytes are checked once more before the atomic rename.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from artscale.contracts.onnx import FLOAT_OUTPUT, IMAGE_INPUT, IMAGE_OUTPUT
from artscale.contracts.run_dir import load_model
from artscale.core.errors import UserError
from artscale.core.progress import Progress
from artscale.export import skeleton
from artscale.models.article import IMAGENET_MEAN, IMAGENET_STD, check_size

ARTICLE_SIZE = 128  # the article trains at 128 px; an article .pth says nothing about its size
# (float tolerance on the [0, 1] output, uint8 tolerance in levels): the gate's limits on FIGURES
FIGURES = ("max_float_diff", "max_uint8_diff")
IMAGE_FP32_TOLERANCE = (1e-4, 1)
IMAGE_FP16_TOLERANCE = (1e-2, 3)  # half precision: ~3 significant digits through 6 conv layers


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


def _torch_reference(model: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        generated, probs = Uint8Model(model)(torch.from_numpy(images))
    return generated.numpy(), probs.numpy()


def _compare(session, model: nn.Module, images: np.ndarray, float_output: bool) -> dict[str, float]:
    want_u8, want_f = _torch_reference(model, images)
    outputs = session.run(None, {IMAGE_INPUT: images})
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
            opset_version=skeleton.OPSET,  # the default dynamo exporter needs the onnxscript package
            input_names=[IMAGE_INPUT],
            output_names=[IMAGE_OUTPUT, FLOAT_OUTPUT],
            dynamic_axes={name: {0: "N", 1: "H", 2: "W"} for name in (IMAGE_INPUT, IMAGE_OUTPUT, FLOAT_OUTPUT)},
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _drop_float_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    keep = [o for o in proto.graph.output if o.name != FLOAT_OUTPUT]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    return proto


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
    from artscale.contracts.run_dir import is_diffusion_source
    from artscale.export.denoiser import export_denoiser

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

    images, parity_source = skeleton.parity_images(shards or None, config, image_size)
    tolerance = IMAGE_FP16_TOLERANCE if fp16 else IMAGE_FP32_TOLERANCE

    def limits(provider: str) -> dict[str, float]:
        return dict(
            zip(FIGURES, skeleton.provider_tolerance(provider, IMAGE_FP32_TOLERANCE, IMAGE_FP16_TOLERANCE, fp16))
        )

    # export, parity gate, full ONNX check, dynamic-shape gate: minutes for a large model on CPU
    bar = Progress(4, "export", unit="step")
    proto = _export_graph(model, image_size, fp16)
    bar.update()
    gated = skeleton.gate_providers(
        proto.SerializeToString(), lambda s: _compare(s, model, images, float_output=True), limits, parity_source
    )
    by_provider = {p: {**m, "tolerance": list(allowed.values())} for p, (m, allowed) in gated.items()}
    parity = gated[skeleton.CPU][0]
    bar.update()
    recorded = {**parity, "images": parity_source, "tolerance": list(tolerance), "providers": by_provider}
    meta = skeleton.metadata(
        {},
        step=weights.step,
        image_size=image_size,
        source=weights.path,
        fp16=fp16,
        config=config,
        parity=recorded,
    )
    data = skeleton.seal(_drop_float_output(proto), meta)
    bar.update()
    # Dynamic shapes: another batch size and a non-square size must work and agree too.
    other = np.ascontiguousarray(np.concatenate([images[:3], images[:3, ::-1]], axis=2)[:, :, : image_size * 2 - 8])
    shape = f"{other.shape[0]} images of {other.shape[1]}x{other.shape[2]}, dynamic shape"
    dynamic = skeleton.gate_providers(
        data, lambda s: _compare(s, model, other, float_output=False), limits, shape, quiet=True
    )
    bar.update()
    bar.close()

    report = skeleton.publish(
        out, data, meta, skeleton.REPORTED, parity=recorded, dynamic_parity=dynamic[skeleton.CPU][0]
    )
    also = skeleton.on_other_providers(by_provider, lambda m: f"{m['max_float_diff']:.2g}, {m['max_uint8_diff']}")
    print(
        f"exported {out} ({report['precision']}, {image_size} px, step {meta['step'] or '?'}): parity on {parity_source}: "
        f"max float diff {parity['max_float_diff']:.2g}, max uint8 diff {parity['max_uint8_diff']}{also}"
    )
    return report

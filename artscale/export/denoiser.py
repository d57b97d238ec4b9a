"""A diffusion run's denoiser to ONNX: one network evaluation, the sampling loop stays outside.

Inputs `sample` float [N, 3, H, W] (the noisy image, scaled by the sampler), `timestep` int64 [N],
`class_labels` int64 [N] (C = the null class); output `prediction` float [N, 3, H, W] (epsilon or
v, as trained). N is dynamic, H and W are the training size. I/O stays float32 with --fp16 (the
casts are in the graph). The metadata carries all a sampler needs: the training scheduler's config,
the classes and the null label, so `artscale sample` matches training without the run dir, and the
UNet's config (its block types: which levels attend), as the run recorded it.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from artscale import __version__
from artscale.contracts.onnx import DENOISER_INPUTS, DENOISER_OUTPUT
from artscale.contracts.run_dir import CONFIG_NAME, EMA_NAME, WEIGHTS_NAME, load_denoiser
from artscale.core.atomic import write_atomic
from artscale.core.errors import UserError
from artscale.data.shard_writer import sha256_file
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import to_model
from artscale.diffusion.schedulers import train_scheduler
from artscale.export.skeleton import OPSET, parity_images, parity_sessions, provider_tolerance

DENOISER_FP32_TOLERANCE = 1e-4
DENOISER_FP16_TOLERANCE = 5e-2  # half precision through ~20 conv and norm layers: about 2 significant digits
PARITY_TIMESTEPS = (999, 700, 400, 100, 0)
PARITY_BATCHES = (1, 3, 8)


class DenoiserGraph(nn.Module):
    """(sample, timestep, class_labels) -> prediction, float32 at the edges whatever the compute dtype."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype != torch.float32:
            from diffusers.utils import logging

            quiet = logging.get_verbosity()
            logging.set_verbosity_error()  # "modules that should be kept in float32: []": there are none
            unet = unet.to(dtype)
            logging.set_verbosity(quiet)
        self.unet, self.dtype = unet, dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample.to(self.dtype), timestep, class_labels=class_labels).sample.float()


def _export_graph(unet: nn.Module, size: int, fp16: bool) -> onnx.ModelProto:
    import copy

    graph = DenoiserGraph(copy.deepcopy(unet), torch.float16 if fp16 else torch.float32).eval()
    example = (torch.zeros(2, 3, size, size), torch.tensor([10, 500]), torch.tensor([0, 1]))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter (dynamo needs onnxscript) and tracer warnings
        torch.onnx.export(
            graph,
            example,
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(DENOISER_INPUTS),
            output_names=[DENOISER_OUTPUT],
            dynamic_axes={name: {0: "N"} for name in (*DENOISER_INPUTS, DENOISER_OUTPUT)},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def parity(session, unet: nn.Module, images: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Max |ONNX - PyTorch| of the prediction on `images` noised to several timesteps, in several batch sizes."""
    x0 = to_model(images)
    noise = noise_for(0, range(len(x0)), x0.shape[1:])
    forward = train_scheduler()  # only alphas: same for any prediction type
    labels = torch.arange(len(x0)) % (num_classes + 1)  # every class and the null label
    worst = 0.0
    for t in PARITY_TIMESTEPS:
        steps = torch.full((len(x0),), t, dtype=torch.long)
        noisy = forward.add_noise(x0, noise, steps)
        with torch.no_grad():
            want = unet(noisy, steps, class_labels=labels).sample.numpy()
        for batch in PARITY_BATCHES:
            for i in range(0, len(x0), batch):
                j = slice(i, i + batch)
                feed = dict(zip(DENOISER_INPUTS, (noisy[j].numpy(), steps[j].numpy(), labels[j].numpy())))
                got = session.run([DENOISER_OUTPUT], feed)[0]
                if got.shape != want[j].shape:
                    raise UserError(
                        f"parity gate failed: ONNX output shape {list(got.shape)}, expected {list(want[j].shape)}"
                    )
                diff = float(np.abs(got.astype(np.float64) - want[j]).max())
                worst = diff if not diff <= worst else worst  # NaN sticks and fails the gate
    return {"max_abs_diff": worst, "timesteps": list(PARITY_TIMESTEPS), "batch_sizes": list(PARITY_BATCHES)}


def export_denoiser(
    source: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    shards: str | Path | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """Export a diffusion run's denoiser to OUT, written only when it matches PyTorch.

    `weights`: ema, raw, or None (the EMA where the run kept one)."""
    from diffusers import DDPMScheduler

    out = Path(out)
    try:
        unet, meta = load_denoiser(source, weights or "ema")
    except UserError:
        if weights:
            raise
        unet, meta = load_denoiser(source, "raw")  # trained with ema_decay=0
    weights = meta["weights"]
    size = int(meta["image_size"])
    classes = list(meta["classes"])
    scheduler = DDPMScheduler.from_config(meta["scheduler"])
    config_path = Path(meta["path"]) / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    images, parity_source = parity_images(Path(shards) if shards else None, config, size)
    tolerance = DENOISER_FP16_TOLERANCE if fp16 else DENOISER_FP32_TOLERANCE

    proto = _export_graph(unet, size, fp16)
    by_provider, measured = {}, {}
    for provider, session in parity_sessions(proto.SerializeToString()):
        allowed = provider_tolerance(provider, DENOISER_FP32_TOLERANCE, DENOISER_FP16_TOLERANCE, fp16)
        found = parity(session, unet, images, len(classes))
        if not found["max_abs_diff"] <= allowed:
            raise UserError(
                f"parity gate failed on {parity_source} ({provider}): max abs diff {found['max_abs_diff']:.3g} "
                f"(allowed {allowed:g}); nothing written"
            )
        by_provider[provider] = {"max_abs_diff": found["max_abs_diff"], "tolerance": allowed}
        if provider == "CPUExecutionProvider":
            measured = found
    checked = {"images": parity_source, "tolerance": tolerance, "providers": by_provider}
    weights_file = Path(meta["path"]) / (EMA_NAME if weights == "ema" else WEIGHTS_NAME)
    props = {
        "artscale_version": __version__,
        "objective": "diffusion",
        "prediction_type": str(meta["prediction_type"]),
        "scheduler": json.dumps(json.loads(scheduler.to_json_string()), sort_keys=True),  # one line
        "unet": json.dumps({k: v for k, v in meta["unet"].items() if not k.startswith("_")}, sort_keys=True),
        "classes": json.dumps(classes),
        "null_label": str(meta["null_label"]),
        "weights": weights,
        "step": "" if meta.get("step") is None else str(meta["step"]),
        "image_size": str(size),
        "source": str(weights_file),
        "source_sha256": sha256_file(weights_file),
        "precision": "fp16" if fp16 else "fp32",
        "config": json.dumps(config, sort_keys=True),
        "parity": json.dumps({**measured, **checked}),
    }
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "artscale", __version__
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, data, tmp=out.with_name(f".{out.name}.tmp-{os.getpid()}"))
    except OSError as e:  # a full disk or a read-only place: nothing half-written stays
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    also = "".join(
        f"; on {p}: {m['max_abs_diff']:.2g} (allowed {m['tolerance']:g})"
        for p, m in by_provider.items()
        if p != "CPUExecutionProvider"
    )
    print(
        f"exported {out} (diffusion denoiser, {props['precision']}, {weights} weights, {size} px, "
        f"step {props['step'] or '?'}): parity on {parity_source} at timesteps {list(PARITY_TIMESTEPS)}, "
        f"batch sizes {list(PARITY_BATCHES)}: max abs diff {measured['max_abs_diff']:.2g} (allowed {tolerance:g}){also}"
    )
    return {
        "path": str(out),
        "bytes": len(data),
        **{k: props[k] for k in ("step", "image_size", "source", "source_sha256", "precision", "weights")},
        "parity": {**measured, **checked},
    }

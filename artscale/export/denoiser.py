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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from artscale.contracts.onnx import DENOISER_INPUTS, DENOISER_OUTPUT
from artscale.contracts.run_dir import CONFIG_NAME, EMA_NAME, WEIGHTS_NAME, load_denoiser
from artscale.contracts.run_files import read_config
from artscale.core.errors import UserError
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import to_model
from artscale.diffusion.schedulers import train_scheduler
from artscale.export import skeleton

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
            opset_version=skeleton.OPSET,
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
    unet, meta = load_denoiser(source, weights)
    weights = meta["weights"]
    size = int(meta["image_size"])
    classes = list(meta["classes"])
    scheduler = DDPMScheduler.from_config(meta["scheduler"])
    config_path = Path(meta["path"]) / CONFIG_NAME
    config = read_config(config_path) or {}
    images, parity_source = skeleton.parity_images(shards or None, config, size)
    tolerance = DENOISER_FP16_TOLERANCE if fp16 else DENOISER_FP32_TOLERANCE

    def limits(provider: str) -> dict[str, float]:
        allowed = skeleton.provider_tolerance(provider, DENOISER_FP32_TOLERANCE, DENOISER_FP16_TOLERANCE, fp16)
        return {"max_abs_diff": allowed}

    proto = _export_graph(unet, size, fp16)
    gated = skeleton.gate_providers(
        proto.SerializeToString(), lambda s: parity(s, unet, images, len(classes)), limits, parity_source
    )
    by_provider = {
        p: {"max_abs_diff": m["max_abs_diff"], "tolerance": allowed["max_abs_diff"]}
        for p, (m, allowed) in gated.items()
    }
    measured = gated[skeleton.CPU][0]
    recorded = {**measured, "images": parity_source, "tolerance": tolerance, "providers": by_provider}
    own = {
        "objective": "diffusion",
        "prediction_type": str(meta["prediction_type"]),
        "scheduler": json.dumps(json.loads(scheduler.to_json_string()), sort_keys=True),  # one line
        "unet": json.dumps({k: v for k, v in meta["unet"].items() if not k.startswith("_")}, sort_keys=True),
        "classes": json.dumps(classes),
        "null_label": str(meta["null_label"]),
        "weights": weights,
        **{k: json.dumps(meta[k], sort_keys=True) for k in ("sampling", "distilled") if meta.get(k)},
    }
    weights_file = Path(meta["path"]) / (EMA_NAME if weights == "ema" else WEIGHTS_NAME)
    props = skeleton.metadata(
        own,
        step=meta.get("step"),
        image_size=size,
        source=weights_file,
        fp16=fp16,
        config=config,
        parity=recorded,
    )
    data = skeleton.seal(proto, props)

    report = skeleton.publish(out, data, props, (*skeleton.REPORTED, "weights"), parity=recorded)
    also = skeleton.on_other_providers(by_provider, lambda m: f"{m['max_abs_diff']:.2g} (allowed {m['tolerance']:g})")
    student = meta.get("distilled")
    kind = f"distilled student, {student['steps']} steps" if student else "diffusion denoiser"
    print(
        f"exported {out} ({kind}, {props['precision']}, {weights} weights, {size} px, "
        f"step {props['step'] or '?'}): parity on {parity_source} at timesteps {list(PARITY_TIMESTEPS)}, "
        f"batch sizes {list(PARITY_BATCHES)}: max abs diff {measured['max_abs_diff']:.2g} (allowed {tolerance:g}){also}"
    )
    return report

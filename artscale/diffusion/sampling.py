"""This module is the one sampling loop: classifier-free guidance over any `predict(x, t, labels)`.

diffusers does the heavy lifting (`UNet2DModel`, `DDPMScheduler` for the forward process, DDIM and
DPM-Solver++ for sampling). What is artscale's own is small:
- pixels: the denoiser sees images in [-1, 1]; uint8 [N, H, W, 3] at the edges;
- classes: labels 0..C-1 are the manifest's classes, C is the null class for classifier-free
  guidance (the UNet has C + 1 class embeddings);
- noise: each image's starting noise is drawn from (seed, key) alone, key being its index or its
  relative path, so an image does not depend on the batch size or how the work is split;
- the loop: cond and uncond in one batch, `predict(x, t, labels)` the only model call, so the same
  loop drives the torch model (training-time grids, `artscale sample RUN_DIR`) and an ONNX session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from artscale.core.errors import UserError

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def to_model(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images, numpy [N, H, W, 3] (decoded files) or torch [N, 3, H, W] (the loader's), to
    float [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) if isinstance(images, np.ndarray) else images
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [N, 3, H, W] to uint8 [N, H, W, 3] (rounded, clipped)."""
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample(
    predict: Predict,
    sampler: Any,
    noise: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    *,
    steps: int = 20,
    guidance: float = 3.0,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Denoise `noise` into images in [-1, 1] with classifier-free guidance.

    `predict(x, t, labels)` returns the model's output for a batch (t an int64 [N] tensor). With
    guidance != 1 the conditional and unconditional halves run as one batch of 2N. With `init`
    (images in [-1, 1]) and `strength` < 1 this is SDEdit: `init` is noised to the timestep
    `strength` of the way up and denoised from there (0 returns `init`, 1 ignores it)."""
    if steps < 1:
        raise UserError(f"steps={steps}: must be >= 1")
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength={strength}: must be in [0, 1]")
    # The timesteps stay on the CPU, and the sampler gets each as a Python int: a CUDA timestep would
    # index the sampler's CPU tables (DDIM's alphas_cumprod) and make the host wait every step.
    sampler.set_timesteps(steps, device="cpu")
    timesteps = sampler.timesteps
    if init is not None and strength < 1.0:
        skip = steps - int(round(steps * strength))
        timesteps = timesteps[skip:]
        if len(timesteps) == 0:
            return init.clone()
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(skip)
        x = sampler.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
    else:
        x = noise * sampler.init_noise_sigma
    n = x.shape[0]
    labels = labels.to(device=x.device, dtype=torch.long)
    both = torch.cat([labels, torch.full_like(labels, null_label)]) if guidance != 1.0 else labels
    for t in timesteps.tolist():
        model_in = sampler.scale_model_input(x, t)
        steps_in = torch.full((len(both),), t, dtype=torch.long, device=x.device)
        if guidance != 1.0:
            out = predict(torch.cat([model_in, model_in]), steps_in, both).float()
            cond, uncond = out[:n], out[n:]
            pred = uncond + guidance * (cond - uncond)
        else:
            pred = predict(model_in, steps_in, both).float()
        x = sampler.step(pred, t, x).prev_sample
    return x


def torch_predict(model: torch.nn.Module) -> Predict:
    """The `predict` of a diffusers UNet2DModel (in eval mode, no grad)."""

    @torch.no_grad()
    def predict(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(x, t, class_labels=labels).sample

    return predict

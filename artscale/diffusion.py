"""Diffusion: a class-conditional UNet denoiser, its noise schedule and the sampler loop.

diffusers does the heavy lifting (`UNet2DModel`, `DDPMScheduler` for the forward process, DDIM and
DPM-Solver++ for sampling). What is artscale's own is small and lives here:
- pixels: the denoiser sees images in [-1, 1]; uint8 [N, H, W, 3] at the edges;
- classes: labels 0..C-1 are the manifest's classes, C is the null class for classifier-free
  guidance (the UNet has C + 1 class embeddings);
- noise: each image's starting noise is drawn from (seed, key) alone, key being its index or its
  relative path, so an image does not depend on the batch size or how the work is split;
- the loop: cond and uncond in one batch, `predict(x, t, labels)` the only model call, so the same
  loop drives the torch model (training-time grids, `artscale sample RUN_DIR`) and an ONNX session.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from artscale.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("ddim", "dpm++")

# name -> (block_out_channels, layers_per_block, norm_num_groups). `tiny` learned five visibly
# different classes at 32 px in about 420 steps of batch 32 on one CPU core (1.06 M parameters).
DENOISER_PRESETS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "tiny": ((32, 64, 64), 1, 8),
    "small": ((64, 128, 128, 256), 2, 32),
    "base": ((128, 256, 256, 512), 2, 32),
}

# name -> (attention levels, channels per attention head). Self-attention sits in the down and up blocks
# of that many lowest-resolution levels, where the field's pixel-space UNets have it. At 128 px, `small`
# attends at 16x16 like DDPM (attn_resolutions=(16,), https://arxiv.org/abs/2006.11239) and diffusers'
# examples/unconditional_image_generation/train_unconditional.py (one AttnDownBlock2D/AttnUpBlock2D pair,
# at 16x16 for 256 px); `base` at 32x32 and 16x16 like ADM (attention_resolutions="32,16,8",
# https://arxiv.org/abs/2105.05233; these presets end at 16x16), with ADM's 64 channels per head. The
# middle block attends in every preset (diffusers' default). `tiny` has no attention below the middle
# block: a training step on CPU is slower with one more level (README). Runs record the structure they
# were built with (denoiser.json's UNet config), so a run started before a change here keeps its own.
PRESET_ATTENTION: dict[str, tuple[int, int]] = {"tiny": (0, 8), "small": (1, 64), "base": (2, 64)}

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def block_types(levels: int, attention_levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(down_block_types, up_block_types): attention in the `attention_levels` lowest-resolution levels."""
    plain = levels - attention_levels
    down = ("DownBlock2D",) * plain + ("AttnDownBlock2D",) * attention_levels
    return down, ("AttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain  # up blocks start at the lowest


def build_denoiser(
    image_size: int,
    num_classes: int,
    block_out_channels: Sequence[int] = DENOISER_PRESETS["tiny"][0],
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention_levels: int = 0,
    attention_head_dim: int = 8,
) -> torch.nn.Module:
    """A diffusers `UNet2DModel` with `num_classes + 1` class embeddings (the last is the null class)."""
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    if image_size % 2 ** (levels - 1):
        raise UserError(f"image_size={image_size} must be a multiple of {2 ** (levels - 1)} for {levels} UNet levels")
    if any(c % norm_num_groups for c in block_out_channels):
        raise UserError(
            f"block_out_channels={list(block_out_channels)} must be multiples of norm_num_groups={norm_num_groups}"
        )
    if not 0 <= attention_levels <= levels:
        raise UserError(f"attention on {attention_levels} levels: the UNet has {levels}")
    attending = list(block_out_channels[levels - attention_levels :]) if attention_levels else []
    if any(c % attention_head_dim for c in attending):
        raise UserError(
            f"block_out_channels={list(block_out_channels)}: the levels with attention ({attending}) must be "
            f"multiples of {attention_head_dim} channels per attention head"
        )
    down, up = block_types(levels, attention_levels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=num_classes + 1,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
    )


def preset_denoiser(
    preset: str,
    image_size: int,
    num_classes: int,
    block_out_channels: Sequence[int] = (),
    layers_per_block: int = 0,
    norm_num_groups: int = 0,
) -> torch.nn.Module:
    """The preset's UNet (its attention included), its shape overridden where given (see denoiser_shape)."""
    channels, layers, groups = denoiser_shape(preset, block_out_channels, layers_per_block, norm_num_groups)
    attention, head_dim = PRESET_ATTENTION[preset]
    return build_denoiser(image_size, num_classes, channels, layers, groups, min(attention, len(channels)), head_dim)


def denoiser_shape(
    preset: str, block_out_channels: Sequence[int] = (), layers_per_block: int = 0, norm_num_groups: int = 0
) -> tuple[tuple[int, ...], int, int]:
    """(block_out_channels, layers_per_block, norm_num_groups): the preset's, each overridden when given."""
    if preset not in DENOISER_PRESETS:
        raise UserError(f"denoiser={preset!r}: choose one of {', '.join(DENOISER_PRESETS)}")
    channels, layers, groups = DENOISER_PRESETS[preset]
    return tuple(block_out_channels) or channels, layers_per_block or layers, norm_num_groups or groups


def train_scheduler(
    prediction_type: str = "v_prediction", beta_schedule: str = "squaredcos_cap_v2", zero_terminal_snr: bool = False
) -> Any:
    """The forward process (`add_noise`, `get_velocity`); its config is what samplers are built from."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        clip_sample=False,
    )


def make_sampler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """DDIM or DPM-Solver++(2M) from the training scheduler's config (same betas, same prediction type).

    Trailing timestep spacing starts at the last training timestep, as the zero-terminal-SNR paper
    asks (https://arxiv.org/abs/2305.08891); both samplers are deterministic given the start noise."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    raise UserError(f"sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def noise_seed(seed: int, key: int | str) -> int:
    """A 63-bit generator seed from (seed, key): an index for sampling, a relative path for img2img."""
    return int.from_bytes(hashlib.sha256(repr((int(seed), key)).encode()).digest()[:8], "little") >> 1


def noise_for(seed: int, keys: Sequence[int | str], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise [len(keys), *shape] on the CPU, each row a function of (seed, key) alone."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(noise_seed(seed, k))) for k in keys]
    return torch.stack(rows) if rows else torch.empty((0, *shape))


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

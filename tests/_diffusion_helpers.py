"""A diffusion run dir written by hand in the training side's format (final/: model and EMA weights,
denoiser.json, config.json with objective=diffusion), so export and sampling are tested without training."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from artscale.diffusion.schedulers import train_scheduler
from artscale.models.denoiser import build_denoiser, denoiser_shape, preset_denoiser

CLASSES = ["cubism", "impressionism", "ukiyo-e"]


def make_diffusion_run(
    run_dir: Path,
    size: int = 16,
    step: int = 11,
    data: str = "",
    seed: int = 0,
    preset: str = "tiny",
    classes=CLASSES,
    old_structure: bool = False,
    channels: tuple[int, ...] = (),
    groups: int = 0,
) -> Path:
    """Random-init denoiser weights of a preset (`channels`, `groups`: narrower, as the config's overrides);
    the EMA copy is the raw weights slightly moved, so the two differ. `old_structure`: the preset as it
    was before it had attention below the middle block."""
    torch.manual_seed(seed)
    if old_structure:
        unet = build_denoiser(size, len(classes), *denoiser_shape(preset, channels, 0, groups))
    else:
        unet = preset_denoiser(preset, size, len(classes), channels, 0, groups)
    raw = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    ema = {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v).contiguous() for k, v in raw.items()}
    sched = train_scheduler()
    config = {
        "objective": "diffusion",
        "image_size": size,
        "data": data or str(run_dir / "no-shards"),
        "denoiser": preset,
        "prediction_type": sched.config.prediction_type,
        "beta_schedule": sched.config.beta_schedule,
        "vgg_weights": "random",
    }
    denoiser = {
        "unet": dict(unet.config),
        "scheduler": dict(sched.config),
        "classes": list(classes),
        "null_label": len(classes),
        "prediction_type": sched.config.prediction_type,
        "image_size": size,
    }
    final = run_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    save_file(raw, str(final / "model.safetensors"))
    save_file(ema, str(final / "ema.safetensors"))
    for name, data_ in (("denoiser.json", denoiser), ("config.json", config), ("trainer_state.json", {"step": step})):
        (final / name).write_text(json.dumps(data_, indent=2, default=list))
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    return run_dir

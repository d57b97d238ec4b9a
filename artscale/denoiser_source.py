"""Reading a diffusion run's denoiser (final/ or a checkpoint dir: weights + denoiser.json).

Stand-in for `checkpoint.load_denoiser` until the training side lands it; same signature and
return value, so the callers do not change when this module goes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from artscale.checkpoint import STATE_NAME, WEIGHTS_NAME, list_checkpoints
from artscale.errors import UserError
from artscale.state_dict import read_state_dict

DENOISER_NAME, EMA_NAME = "denoiser.json", "ema.safetensors"


def load_denoiser(source: str | Path, weights: str = "ema") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(UNet2DModel in eval mode, denoiser.json + step, weights, path) from a run, checkpoint or final/ dir."""
    from diffusers import UNet2DModel

    source = Path(source)
    if not source.exists():
        raise UserError(f"{source} not found")
    found = [source] if (source / DENOISER_NAME).is_file() else []
    found = found or [d for d in [source / "final"] if (d / DENOISER_NAME).is_file()]
    found = found or [p for _, p in reversed(list_checkpoints(source)) if (p / DENOISER_NAME).is_file()][:1]
    if not found:
        raise UserError(f"{source} holds no diffusion denoiser ({DENOISER_NAME} in it, in final/ or a checkpoint)")
    where = found[0]
    name = {"ema": EMA_NAME, "raw": WEIGHTS_NAME}.get(weights)
    if name is None:
        raise UserError(f"--weights {weights}: choose ema or raw")
    if not (where / name).is_file():
        raise UserError(f"{where} has no {name} (trained without EMA?): use --weights raw")
    meta = json.loads((where / DENOISER_NAME).read_text())
    unet = UNet2DModel.from_config(meta["unet"])
    unet.load_state_dict(read_state_dict(where / name))
    state = json.loads((where / STATE_NAME).read_text()) if (where / STATE_NAME).is_file() else {}
    return unet.eval(), {**meta, "step": state.get("step"), "weights": weights, "path": str(where)}

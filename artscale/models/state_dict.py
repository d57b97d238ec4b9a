"""Reading a state-dict file, for the model's weights and VGG16's alike; nothing here unpickles."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from artscale.core.errors import UserError


def read_state_dict(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (weights_only: never unpickles code).

    The usual wrappers (`{"state_dict": ...}`, `{"model_state_dict": ...}`, nn.DataParallel's
    `module.` prefix) are taken off: the article saved `model.state_dict()`, others do not."""
    try:
        obj: Any = (
            load_file(str(path))
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: never pass that on
        raise UserError(
            f"cannot read {what} {path}: it holds objects other than tensors (refused: loading it could run code)"
        ) from None
    except Exception as e:  # truncated zip, not a tensor file at all
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {msg[:200]}") from None
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict")
    if obj and all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj

"""Checkpoint I/O, the one place for it: final weights, checkpoint discovery, loading any source.

Layout of a run dir (DESIGN.md):
    runs/NAME/config.json
    runs/NAME/checkpoints/step-000400/   accelerate save_state + config.json + trainer_state.json
    runs/NAME/final/                     model.safetensors + config.json + trainer_state.json
Nothing here unpickles: safetensors, JSON, and `torch.load(weights_only=True)` for article files.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from artscale.errors import UserError
from artscale.model import ConvDiffusionModel

WEIGHTS_NAME = "model.safetensors"  # what accelerate's save_state names the first model
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_SUFFIX = ".tmp"


@dataclass
class Weights:
    """A ConvDiffusionModel state dict and what is known of where it came from."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # the run's TrainConfig as saved, None for an article .pth
    step: int | None
    path: Path


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under run_dir/checkpoints, oldest first (temporary dirs are not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def save_final(state_dict: dict[str, torch.Tensor], run_dir: str | Path, config: dict[str, Any], step: int) -> Path:
    """Write run_dir/final (safetensors + config + step) under a temporary name, then swap it in."""
    final = Path(run_dir) / "final"
    tmp = final.with_name("final" + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS_NAME))
    write_json_atomic(tmp / CONFIG_NAME, config)
    write_json_atomic(tmp / STATE_NAME, {"step": step})
    old = final.with_name("final.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _resolve(source: Path) -> Path:
    """A run dir, a checkpoint dir or a weights file -> the weights file to read."""
    if not source.exists():
        raise UserError(f"checkpoint {source} not found")
    if source.is_file():
        return source
    if (source / WEIGHTS_NAME).is_file():
        return source / WEIGHTS_NAME
    if (source / "final" / WEIGHTS_NAME).is_file():
        return source / "final" / WEIGHTS_NAME
    latest = latest_checkpoint(source)
    if latest is not None and (latest / WEIGHTS_NAME).is_file():
        return latest / WEIGHTS_NAME
    raise UserError(f"{source} holds no weights (expected {WEIGHTS_NAME}, final/ or checkpoints/step-*)")


def _article_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The article saved `model.state_dict()`; accept the usual wrappers around one too."""
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


def check_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, in one line, anything that is not a ConvDiffusionModel's state dict."""
    expected = ConvDiffusionModel().state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise UserError(f"{path} is not a ConvDiffusionModel state dict ({detail})")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise UserError(f"{path} is not a ConvDiffusionModel state dict ({k} has shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)})")


def load_weights(source: str | Path) -> Weights:
    """Weights from a run dir, a checkpoint dir, a .safetensors file or an article .pth file."""
    path = _resolve(Path(source))
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(str(path))
        else:
            state_dict = _article_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    except UserError:
        raise
    except Exception as e:  # truncated zip, pickle with code in it, not a tensor file at all
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {msg[:200]}") from None
    check_state_dict(state_dict, path)
    config = _read_json(path.parent / CONFIG_NAME) if path.name == WEIGHTS_NAME else None
    state = _read_json(path.parent / STATE_NAME) if path.name == WEIGHTS_NAME else None
    return Weights(state_dict, config, state.get("step") if state else None, path)


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[ConvDiffusionModel, Weights]:
    weights = load_weights(source)
    model = ConvDiffusionModel()
    model.load_state_dict(weights.state_dict)
    return model.to(device).eval(), weights

"""This module reads run dirs, checkpoints and weight files: the one place that does, for every stage.

Training writes them (artscale.train.checkpoint); export, sample, report and info read them here.

Layout of a run dir:
    runs/NAME/config.json
    runs/NAME/checkpoints/step-000400/   accelerate save_state + config.json + trainer_state.json
    runs/NAME/final/                     model.safetensors + config.json + trainer_state.json
A diffusion run's checkpoints and final/ also hold denoiser.json (UNet and scheduler configs,
classes); any run with EMA on holds ema.safetensors (the averaged weights, same keys).
Nothing here unpickles: safetensors, JSON, and `torch.load(weights_only=True)` for article files.
Each JSON file is read through its schema in artscale.contracts.run_files (one line naming the file and
the field where it breaks one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from artscale.contracts.run_files import (
    read_config,
    read_denoiser,
    read_metrics_counted,
    read_state,
)
from artscale.core.checks import BadFile
from artscale.core.errors import UserError
from artscale.models.article import ConvDiffusionModel
from artscale.models.state_dict import read_state_dict

WEIGHTS_NAME = "model.safetensors"  # what accelerate's save_state names the first model
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"
DENOISER_NAME = "denoiser.json"
UNFINISHED_SUFFIX = ".tmp"  # a checkpoint (or final/) being written: ignored, removed by the next save
STEP_DIR = re.compile(r"^step-(\d+)$")


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


def _resolve(source: Path) -> Path:
    """A run dir, a checkpoint dir or a weights file -> the weights file to read."""
    if not source.exists():
        raise UserError(f"checkpoint {source} not found")
    if source.is_file():
        return source
    if (source / WEIGHTS_NAME).is_file():
        return source / WEIGHTS_NAME
    final = source / "final" / WEIGHTS_NAME
    found = [(step, p / WEIGHTS_NAME) for step, p in list_checkpoints(source) if (p / WEIGHTS_NAME).is_file()]
    if final.is_file():
        # A run continued past its first end (a larger max_steps) has checkpoints newer than final/.
        final_step = (read_state(final.parent / STATE_NAME) or {}).get("step", -1)
        if not found or final_step >= found[-1][0]:
            return final
    if found:
        return found[-1][1]
    raise UserError(f"{source} holds no weights (expected {WEIGHTS_NAME}, final/ or checkpoints/step-*)")


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
            raise UserError(
                f"{path} is not a ConvDiffusionModel state dict ({k} has shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)})"
            )


def load_weights(source: str | Path, weights: str | None = None) -> Weights:
    """Weights from a run dir, a checkpoint dir, a .safetensors file or an article .pth file.

    `weights`: "ema" (the averaged weights; an error where the run kept none), "raw", or None:
    the EMA where the run kept one, else the raw weights."""
    path = _resolve(Path(source))
    if path.name == WEIGHTS_NAME and (path.parent / DENOISER_NAME).is_file():
        raise UserError(f"{source} is a diffusion run (objective=diffusion), not the article's model")
    if weights not in (None, "ema", "raw"):
        raise UserError(f"weights={weights!r}: choose ema or raw")
    ema = path.with_name(EMA_NAME)
    if weights == "ema" and (path.name != WEIGHTS_NAME or not ema.is_file()):
        raise UserError(f"{source} holds no EMA weights (ema_decay was 0): use --weights raw")
    if weights != "raw" and path.name == WEIGHTS_NAME and ema.is_file():
        path = ema
    state_dict = read_state_dict(path)
    check_state_dict(state_dict, path)
    in_run = path.name in (WEIGHTS_NAME, EMA_NAME)
    config = read_config(path.parent / CONFIG_NAME) if in_run else None
    state = read_state(path.parent / STATE_NAME) if in_run else None
    return Weights(state_dict, config, state.get("step") if state else None, path)


def load_model(
    source: str | Path, device: str | torch.device = "cpu", weights: str | None = None
) -> tuple[ConvDiffusionModel, Weights]:
    weights = load_weights(source, weights)
    model = ConvDiffusionModel()
    model.load_state_dict(weights.state_dict)
    return model.to(device).eval(), weights


# What a UNet record must agree on with the config to be resumed under it (the weights' shapes).
UNET_SHAPE_KEYS = ("sample_size", "block_out_channels", "layers_per_block", "norm_num_groups", "num_class_embeds")


def unet_config(meta: dict[str, Any]) -> dict[str, Any]:
    """denoiser.json's UNet2DModel config. One without block types or head size is read as the structure
    artscale built before its presets had attention: none below the middle block, 8 channels per head
    (diffusers' own defaults for those keys differ, so leaving them to diffusers would build another net)."""
    unet = dict(meta["unet"])
    levels = len(unet.get("block_out_channels") or ())
    unet.setdefault("down_block_types", ["DownBlock2D"] * levels)
    unet.setdefault("up_block_types", ["UpBlock2D"] * levels)
    unet.setdefault("attention_head_dim", 8)
    return unet


def load_denoiser(source: str | Path, weights: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A diffusion run's UNet2DModel (eval mode) and its denoiser.json + {step, weights, path}, from a
    run dir (final/, else the newest checkpoint), a checkpoint dir or final/ itself. The UNet is built
    from the record, not from the run's preset name: a run keeps the structure it was trained with.

    `weights`: "ema" (an error where the run kept none), "raw", or None: the EMA where the run kept one
    (ema_decay > 0), else the raw weights, as `load_weights`."""
    from diffusers import UNet2DModel

    if weights not in (None, "ema", "raw"):
        raise UserError(f"weights={weights!r}: choose ema or raw")
    folder = _resolve(Path(source)).parent
    meta = read_denoiser(folder / DENOISER_NAME)
    if meta is None:
        raise UserError(f"{source} is not a diffusion run (no {DENOISER_NAME}): train with objective=diffusion")
    if weights is None:
        weights = "ema" if (folder / EMA_NAME).is_file() else "raw"
    path = folder / (EMA_NAME if weights == "ema" else WEIGHTS_NAME)
    if not path.is_file():
        raise UserError(f"{folder} holds no EMA weights (trained with ema_decay=0): use --weights raw")
    meta = {**meta, "unet": unet_config(meta)}
    try:
        model = UNet2DModel.from_config(meta["unet"])
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise BadFile(
            folder / DENOISER_NAME, "unet", f"does not build a UNet ({str(e).splitlines()[0][:120]})"
        ) from None
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as e:
        raise UserError(f"{path} does not fit its {DENOISER_NAME}: {str(e).splitlines()[0][:200]}") from None
    step = (read_state(folder / STATE_NAME) or {}).get("step")
    return model.eval(), {**meta, "step": step, "weights": weights, "path": str(folder)}


SAMPLE_GRID = re.compile(r"^step-(\d+)\.png$")


@dataclass
class RunDir:
    """What a run dir holds, read without loading weights: what `artscale report` shows."""

    path: Path
    config: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    unreadable_metrics: int  # lines of metrics.jsonl left out (not JSON: a torn or corrupt line)
    checkpoints: list[tuple[int, Path, dict[str, Any]]]  # step, folder, trainer state; oldest first
    final: dict[str, Any] | None  # final/'s trainer state (its step)
    denoiser: dict[str, Any] | None  # a diffusion run's denoiser.json (final/, else the newest checkpoint)
    samples: list[tuple[int, Path]]  # samples/step-XXXXXX.png, by step


def is_run_dir(path: str | Path) -> bool:
    """A run dir, as training writes it from its first step on (a checkpoint dir is not one)."""
    path = Path(path)
    if not path.is_dir() or (path / STATE_NAME).is_file():
        return False
    return any((path / name).exists() for name in (CONFIG_NAME, "metrics.jsonl", "checkpoints", "final"))


def read_run_dir(path: str | Path) -> RunDir:
    """Everything `artscale report` shows of a run dir; a UserError (one line) when it is not one."""
    path = Path(path)
    if not is_run_dir(path):
        raise UserError(f"{path} is not a run dir (no {CONFIG_NAME}, metrics.jsonl, checkpoints/ or final/)")
    metrics, bad = read_metrics_counted(path / "metrics.jsonl")
    checkpoints = [(step, p, read_state(p / STATE_NAME) or {}) for step, p in list_checkpoints(path)]
    folders = [path / "final"] + [p for _, p, _ in reversed(checkpoints)]
    denoiser = next((read_denoiser(f / DENOISER_NAME) for f in folders if (f / DENOISER_NAME).is_file()), None)
    samples = []
    if (path / "samples").is_dir():
        for p in (path / "samples").iterdir():
            if m := SAMPLE_GRID.match(p.name):
                samples.append((int(m.group(1)), p))
    return RunDir(
        path,
        read_config(path / CONFIG_NAME),
        metrics,
        bad,
        checkpoints,
        read_state(path / "final" / STATE_NAME),
        denoiser,
        sorted(samples),
    )


def _size(path: Path) -> str:
    n = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{n / 1e6:.1f} MB"


def _num(row: dict[str, Any], key: str, spec: str) -> str:
    """A logged number (checked by the metrics schema), or ? where the entry lacks it."""
    return format(row[key], spec) if key in row else "?"


def describe(path: str | Path) -> str:
    """What a run dir, a checkpoint dir or a weights file holds (for `artscale info`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found")
    lines: list[str] = []
    config = read_config(path / CONFIG_NAME) if path.is_dir() else None
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "final").is_dir()):
        lines.append(f"run dir {path}")
        if config:
            lines.append(
                "  config: "
                + ", ".join(
                    f"{k}={config.get(k)}"
                    for k in ("data", "image_size", "batch_size", "lr", "max_steps", "epochs", "mixed_precision")
                )
            )
        found = list_checkpoints(path)
        lines.append(
            f"  checkpoints: {len(found)}"
            + (f" (steps {', '.join(str(s) for s, _ in found)}; latest {found[-1][1]})" if found else "")
        )
        for tmp in sorted((path / "checkpoints").glob("*" + UNFINISHED_SUFFIX)):
            lines.append(f"  incomplete: {tmp.name} (a save that did not finish; ignored, removed by the next save)")
        logged, bad = read_metrics_counted(path / "metrics.jsonl")
        if bad:
            lines.append(f"  metrics.jsonl: {bad} unreadable line{'s' * (bad > 1)} skipped")
        train = next((m for m in reversed(logged) if "loss" in m), None)
        val = next((m for m in reversed(logged) if "val/psnr" in m), None)
        if train:
            lines.append(
                f"  last logged: step {train['step']} loss {_num(train, 'loss', '.4f')} lr {_num(train, 'lr', '.3g')} "
                f"({_num(train, 'img_per_s', '.1f')} img/s)"
            )
        if val:
            lines.append(
                f"  last val: step {val['step']} mse {_num(val, 'val/mse', '.4f')} psnr {_num(val, 'val/psnr', '.2f')} "
                f"ssim {_num(val, 'val/ssim', '.3f')}"
            )
        final = read_state(path / "final" / STATE_NAME)
        lines.append(
            f"  final weights: step {final.get('step')} ({path / 'final' / WEIGHTS_NAME})"
            if final
            else "  final weights: none yet"
        )
        folders = [path / "final"] + [p for _, p in reversed(found)]
        denoiser = next((read_denoiser(f / DENOISER_NAME) for f in folders if (f / DENOISER_NAME).is_file()), None)
        lines += describe_denoiser(denoiser, config)
        return "\n".join(lines)
    if path.is_dir() and (path / STATE_NAME).is_file():
        state = read_state(path / STATE_NAME) or {}
        lines.append(f"checkpoint {path} ({_size(path)})")
        lines.append("  state: " + ", ".join(f"{k}={v}" for k, v in sorted(state.items())))
        if config:
            lines.append(
                "  config: " + ", ".join(f"{k}={config.get(k)}" for k in ("data", "image_size", "batch_size", "lr"))
            )
        lines.append("  files: " + ", ".join(sorted(p.name for p in path.iterdir())))
        return "\n".join(lines)
    weights = load_weights(path)
    params = sum(v.numel() for v in weights.state_dict.values())
    lines.append(f"weights {weights.path}: ConvDiffusionModel, {len(weights.state_dict)} tensors, {params:,} values")
    lines.append(f"  step: {weights.step if weights.step is not None else 'unknown (article .pth)'}")
    return "\n".join(lines)


def describe_denoiser(meta: dict[str, Any] | None, config: dict[str, Any] | None = None) -> list[str]:
    """`artscale info`'s lines on a diffusion run: what it samples with by default, and a student's teacher."""
    if not meta:
        return []
    config = config or {}
    sampling = meta.get("sampling") or {
        "sampler": config.get("sampler", "dpm++"),
        "steps": config.get("sample_steps", 20),
        "guidance": config.get("guidance", 3.0),
    }
    passes = 1 if sampling.get("guidance_baked") or sampling["guidance"] == 1 else 2
    lines = [
        f"  diffusion denoiser: {len(meta.get('classes') or [])} classes, {meta.get('image_size')} px; samples with "
        f"{sampling['sampler']} {sampling['steps']} steps, guidance {sampling['guidance']:g} "
        f"({passes} pass{'es' * (passes > 1)} per step)"
    ]
    if student := meta.get("distilled"):
        lines.append(
            f"  distilled from {student.get('teacher')} (step {student.get('teacher_step')}, "
            f"{student.get('teacher_weights')} weights): {student.get('steps')} steps, guidance "
            f"{student.get('guidance'):g} baked in, {student.get('teacher_substeps')} teacher steps per step"
        )
    return lines


def is_diffusion_source(source: str | Path) -> bool:
    """True when SOURCE (run dir, checkpoint dir, final/) holds a diffusion denoiser."""
    source = Path(source)
    if source.is_dir() and (source / DENOISER_NAME).is_file():
        return True
    try:
        weights = _resolve(source)
    except UserError:
        return False
    config = weights.parent / CONFIG_NAME
    if weights.name != WEIGHTS_NAME:
        return False
    if (weights.parent / DENOISER_NAME).is_file():
        return True
    return (read_config(config) or {}).get("objective") == "diffusion"

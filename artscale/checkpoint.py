"""Checkpoint I/O, the one place for it: final weights, checkpoint discovery, loading any source.

Layout of a run dir:
    runs/NAME/config.json
    runs/NAME/checkpoints/step-000400/   accelerate save_state + config.json + trainer_state.json
    runs/NAME/final/                     model.safetensors + config.json + trainer_state.json
A diffusion run's checkpoints and final/ also hold denoiser.json (UNet and scheduler configs,
classes); any run with EMA on holds ema.safetensors (the averaged weights, same keys).
Nothing here unpickles: safetensors, JSON, and `torch.load(weights_only=True)` for article files.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from artscale.atomic import write_json_atomic
from artscale.errors import UserError
from artscale.model import ConvDiffusionModel
from artscale.state_dict import read_state_dict

WEIGHTS_NAME = "model.safetensors"  # what accelerate's save_state names the first model
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"
DENOISER_NAME = "denoiser.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_SUFFIX = ".tmp"
# How long a rank waits to see the checkpoint rank 0 resumes from (a shared filesystem's caches lag by seconds).
RESUME_WAIT_S = 60.0


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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's entries; a line that is not JSON (the torn last line of a killed run) is left out."""
    return read_metrics_counted(path)[0]


def read_metrics_counted(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl's entries and how many lines were left out as unreadable (not a JSON object)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def save_final(
    state_dict: dict[str, torch.Tensor],
    run_dir: str | Path,
    config: dict[str, Any],
    step: int,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write run_dir/final (safetensors + config + step, then what `extras(dir)` adds: EMA weights,
    denoiser.json) under a temporary name, then swap it in."""
    final = Path(run_dir) / "final"
    tmp = final.with_name("final" + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS_NAME))
    write_json_atomic(tmp / CONFIG_NAME, config)
    write_json_atomic(tmp / STATE_NAME, {"step": step})
    if extras is not None:
        extras(tmp)
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
    final = source / "final" / WEIGHTS_NAME
    found = [(step, p / WEIGHTS_NAME) for step, p in list_checkpoints(source) if (p / WEIGHTS_NAME).is_file()]
    if final.is_file():
        # A run continued past its first end (a larger max_steps) has checkpoints newer than final/.
        final_step = (_read_json(final.parent / STATE_NAME) or {}).get("step", -1)
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
    config = _read_json(path.parent / CONFIG_NAME) if in_run else None
    state = _read_json(path.parent / STATE_NAME) if in_run else None
    return Weights(state_dict, config, state.get("step") if state else None, path)


def load_model(
    source: str | Path, device: str | torch.device = "cpu", weights: str | None = None
) -> tuple[ConvDiffusionModel, Weights]:
    weights = load_weights(source, weights)
    model = ConvDiffusionModel()
    model.load_state_dict(weights.state_dict)
    return model.to(device).eval(), weights


# Keys whose change alters what a run computes: a run dir trained with other values is refused
# unless force=true. The rest (steps, logging, workers, tracker, resume) may change between runs.
RUN_DEFINING_KEYS = (
    "data",
    "image_size",
    "batch_size",
    "lr",
    "scale_lr",
    "lr_step_epochs",
    "lr_gamma",
    "lr_schedule",
    "warmup_steps",
    "grad_accum",
    "max_grad_norm",
    "perceptual_weight",
    "vgg_weights",
    "mixed_precision",
    "hflip",
    "seed",
    "objective",
    "denoiser",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "prediction_type",
    "beta_schedule",
    "zero_terminal_snr",
    "min_snr_gamma",
    "cond_drop",
    "ema_decay",
)


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


def load_denoiser(source: str | Path, weights: str = "ema") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A diffusion run's UNet2DModel (eval mode) and its denoiser.json + {step, weights, path}, from a
    run dir (final/, else the newest checkpoint), a checkpoint dir or final/ itself. The UNet is built
    from the record, not from the run's preset name: a run keeps the structure it was trained with."""
    from diffusers import UNet2DModel

    if weights not in ("ema", "raw"):
        raise UserError(f"weights={weights!r}: choose ema or raw")
    folder = _resolve(Path(source)).parent
    meta = _read_json(folder / DENOISER_NAME)
    if meta is None:
        raise UserError(f"{source} is not a diffusion run (no {DENOISER_NAME}): train with objective=diffusion")
    path = folder / (EMA_NAME if weights == "ema" else WEIGHTS_NAME)
    if not path.is_file():
        raise UserError(f"{folder} holds no EMA weights (trained with ema_decay=0): use --weights raw")
    meta = {**meta, "unet": unet_config(meta)}
    model = UNet2DModel.from_config(meta["unet"])
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as e:
        raise UserError(f"{path} does not fit its {DENOISER_NAME}: {str(e).splitlines()[0][:200]}") from None
    step = (_read_json(folder / STATE_NAME) or {}).get("step")
    return model.eval(), {**meta, "step": step, "weights": weights, "path": str(folder)}


def resume_denoiser(checkpoint: Path, fresh: torch.nn.Module) -> torch.nn.Module:
    """The UNet to resume `checkpoint` with: the one its denoiser.json records, so a run started under an
    earlier preset (no attention below the middle block) continues as it began; `fresh` (the config's)
    where the checkpoint holds no record. A record whose weight shapes differ from the config's is refused."""
    from diffusers import UNet2DModel

    meta = _read_json(checkpoint / DENOISER_NAME)
    if meta is None:
        return fresh
    recorded = unet_config(meta)
    canonical = json.loads(json.dumps({k: fresh.config[k] for k in UNET_SHAPE_KEYS}))
    changed = [k for k in UNET_SHAPE_KEYS if recorded.get(k) != canonical[k]]
    if changed:
        diffs = ", ".join(f"{k}={recorded.get(k)!r} there, {canonical[k]!r} now" for k in changed)
        raise UserError(f"{checkpoint} holds another denoiser ({diffs}): resume with its settings, or a new run_dir")
    return UNet2DModel.from_config(recorded)


def check_run_dir(run_dir: str | Path, config: dict[str, Any], force: bool) -> None:
    """Refuse to continue a run dir whose saved config.json defines a different run (unless forced)."""
    saved = _read_json(Path(run_dir) / CONFIG_NAME)
    if saved is None or force:
        return
    changed = [k for k in RUN_DEFINING_KEYS if k in saved and saved[k] != config.get(k)]
    if changed:
        diffs = ", ".join(f"{k}={saved[k]!r} there, {config.get(k)!r} now" for k in changed[:4])
        raise UserError(
            f"run_dir {run_dir} was trained with another config ({diffs}): pick a new run_dir, or force=true"
        )


def resume_point(run_dir: str | Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (or None); a path -> that checkpoint; "" -> None, if run_dir has none."""
    if resume == "latest":
        return latest_checkpoint(run_dir)
    if not resume:
        found = list_checkpoints(run_dir)
        if found:
            raise UserError(
                f"run_dir {run_dir} holds checkpoints up to step {found[-1][0]}: resume=latest continues it; or pick a new run_dir"
            )
        return None
    path = Path(resume).expanduser()
    if not (path / STATE_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise UserError(f"resume={resume}: not a complete checkpoint (expected {STATE_NAME} and {WEIGHTS_NAME} in it)")
    return path


def shared_resume_point(acc: Any, run_dir: str | Path, resume: str, wait_s: float = RESUME_WAIT_S) -> Path | None:
    """Rank 0's `resume_point`, the same on every rank (its refusal too). On a shared filesystem that
    lags (NFS attribute caching), a rank on another node can see another newest checkpoint than rank
    0 does, and ranks that load different steps would train on in silence, diverged. A rank waits up
    to `wait_s` for rank 0's checkpoint to appear complete, then stops with one line."""
    from accelerate.utils import broadcast_object_list

    try:
        mine: Path | None | UserError = resume_point(run_dir, resume)
    except UserError as e:
        mine = e
    if acc.num_processes == 1:
        if isinstance(mine, UserError):
            raise mine
        return mine
    refusal = str(mine) if isinstance(mine, UserError) else ""
    local = "" if refusal or mine is None else str(mine)
    chosen, refusal = broadcast_object_list([local, refusal] if acc.is_main_process else [None, None], from_process=0)
    if refusal:
        raise UserError(refusal)
    if chosen != local:
        print(
            f"rank {acc.process_index}: resume={resume} finds {local or 'no checkpoint'} here, rank 0 "
            f"{chosen or 'no checkpoint'}: every rank takes rank 0's",
            flush=True,
        )
    if not chosen:
        return None
    path = Path(chosen)
    deadline = time.monotonic() + wait_s
    while not ((path / STATE_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        if time.monotonic() > deadline:
            raise UserError(
                f"rank {acc.process_index} does not see {path} complete after {wait_s:g} s, where rank 0 resumes "
                "from: put run_dir on a filesystem all ranks share"
            )
        time.sleep(1.0)
    return path


def _is_write_failure(e: Exception) -> bool:
    """A full disk surfaces as OSError from Python, but as SafetensorError or torch.save's RuntimeError too."""
    text = str(e)
    return isinstance(e, OSError) or any(
        s in text for s in ("os error", "I/O error", "file write failed", "No space left")
    )


class CheckpointManager:
    """Owns when, where and how many: accelerate `save_state` into step-XXXXXX.tmp, config and
    trainer state beside it, rename when complete, keep the newest `keep`.

    Weights are saved from the plain module (`net`), never the DDP or torch.compile wrapper, so
    their keys are the model's own (`enc1.0.weight`, not `module.` or `_orig_mod.`) and a
    checkpoint from N processes loads in M. Needs run_dir on a filesystem all ranks share.
    """

    def __init__(
        self,
        accelerator: Any,
        run_dir: str | Path,
        config: dict[str, Any],
        net: torch.nn.Module,
        every: int,
        keep: int,
        extras: Callable[[Path], None] | None = None,
    ) -> None:
        self.accelerator, self.config, self.net, self.extras = accelerator, config, net, extras
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.keep = every, keep
        self.last_saved: int | None = None
        accelerator.register_save_state_pre_hook(self._save_plain_weights)
        accelerator.register_load_state_pre_hook(self._load_plain_weights)

    def _save_plain_weights(self, models: list, weights: list, output_dir: str) -> None:
        weights[0] = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def _load_plain_weights(self, models: list, input_dir: str) -> None:
        path = Path(input_dir)
        if (path / DENOISER_NAME).is_file():
            self.net.load_state_dict(read_state_dict(path / WEIGHTS_NAME))
        else:
            self.net.load_state_dict(load_weights(input_dir, "raw").state_dict)
        models.pop(0)  # loaded: accelerate would look for its own (wrapped) keys

    def load(self, path: Path) -> dict[str, Any]:
        """Model, optimizer, scaler and RNG state from `path`; returns its trainer state."""
        self.accelerator.load_state(str(path))
        state = _read_json(path / STATE_NAME) or {}
        self.last_saved = state.get("step")
        return state

    def maybe_save(self, step: int, state: dict[str, Any]) -> Path | None:
        return self.save(step, state) if step % self.every == 0 else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Every rank calls this at the same step. A failed write (disk full) keeps the previous checkpoint."""
        acc = self.accelerator
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        error: Exception | None = None
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                write_json_atomic(tmp / CONFIG_NAME, self.config)
                write_json_atomic(tmp / STATE_NAME, {**state, "step": step})
                if self.extras is not None:
                    self.extras(tmp)
        except Exception as e:  # ENOSPC, EFBIG, EDQUOT, EIO: say so on every rank, keep what was there
            if not _is_write_failure(e):
                raise
            error = e
        failed = acc.reduce(torch.tensor(float(error is not None), device=acc.device), "sum").item()
        if failed:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = latest_checkpoint(self.root.parent)
            why = f"{type(error).__name__}: {error}" if error else "failed on another rank"
            raise UserError(f"could not write checkpoint {final} ({why}); kept {kept or 'no earlier checkpoint'}")
        if acc.is_main_process:
            if final.exists():  # the same step saved again (a resumed run that had nothing left to do)
                shutil.rmtree(final)
            tmp.replace(final)
            self._prune()
        acc.wait_for_everyone()
        self.last_saved = step
        return final

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root.parent)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for leftover in self.root.glob("step-*" + TMP_SUFFIX):  # from a run killed while saving
            shutil.rmtree(leftover, ignore_errors=True)


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
    checkpoints = [(step, p, _read_json(p / STATE_NAME) or {}) for step, p in list_checkpoints(path)]
    folders = [path / "final"] + [p for _, p, _ in reversed(checkpoints)]
    denoiser = next((_read_json(f / DENOISER_NAME) for f in folders if (f / DENOISER_NAME).is_file()), None)
    samples = []
    if (path / "samples").is_dir():
        for p in (path / "samples").iterdir():
            if m := SAMPLE_GRID.match(p.name):
                samples.append((int(m.group(1)), p))
    return RunDir(
        path,
        _read_json(path / CONFIG_NAME),
        metrics,
        bad,
        checkpoints,
        _read_json(path / "final" / STATE_NAME),
        denoiser,
        sorted(samples),
    )


def _size(path: Path) -> str:
    n = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{n / 1e6:.1f} MB"


def describe(path: str | Path) -> str:
    """What a run dir, a checkpoint dir or a weights file holds (for `artscale info`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found")
    lines: list[str] = []
    config = _read_json(path / CONFIG_NAME) if path.is_dir() else None
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
        for tmp in sorted((path / "checkpoints").glob("*" + TMP_SUFFIX)):
            lines.append(f"  incomplete: {tmp.name} (a save that did not finish; ignored, removed by the next save)")
        logged, bad = read_metrics_counted(path / "metrics.jsonl")
        if bad:
            lines.append(f"  metrics.jsonl: {bad} unreadable line{'s' * (bad > 1)} skipped")
        train = next((m for m in reversed(logged) if "loss" in m), None)
        val = next((m for m in reversed(logged) if "val/psnr" in m), None)
        if train:
            lines.append(
                f"  last logged: step {train['step']} loss {train['loss']:.4f} lr {train['lr']:.3g} ({train['img_per_s']:.1f} img/s)"
            )
        if val:
            lines.append(
                f"  last val: step {val['step']} mse {val['val/mse']:.4f} psnr {val['val/psnr']:.2f} ssim {val['val/ssim']:.3f}"
            )
        final = _read_json(path / "final" / STATE_NAME)
        lines.append(
            f"  final weights: step {final.get('step')} ({path / 'final' / WEIGHTS_NAME})"
            if final
            else "  final weights: none yet"
        )
        return "\n".join(lines)
    if path.is_dir() and (path / STATE_NAME).is_file():
        state = _read_json(path / STATE_NAME) or {}
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

"""Checkpoints written while training: when, where, how many kept, resumed from which, and the final weights."""

from __future__ import annotations

import json
import pickle
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from artscale.contracts.run_dir import (
    CONFIG_NAME,
    DENOISER_NAME,
    STATE_NAME,
    UNET_SHAPE_KEYS,
    UNFINISHED_SUFFIX,
    WEIGHTS_NAME,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    step_dir_name,
    unet_config,
)
from artscale.contracts.run_files import broken_pickle, read_denoiser, read_state
from artscale.core.atomic import UnsafePath, fresh_dir, remove_tree, write_json_atomic
from artscale.core.errors import UserError
from artscale.models.state_dict import read_state_dict
from artscale.train.config import saved_config

# How long a rank waits to see the checkpoint rank 0 resumes from (a shared filesystem's caches lag by seconds).
RESUME_WAIT_S = 60.0


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
    tmp = fresh_dir(final.with_name("final" + UNFINISHED_SUFFIX))  # never a planted link's target
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS_NAME))
    write_json_atomic(tmp / CONFIG_NAME, config)
    write_json_atomic(tmp / STATE_NAME, {"step": step})
    if extras is not None:
        extras(tmp)
    old = final.with_name("final.old")
    if final.exists() or final.is_symlink():
        remove_tree(old)
        final.replace(old)
    tmp.replace(final)
    remove_tree(old)
    return final


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
    "teacher",
    "teacher_substeps",
    "teacher_sampler",
)


def resume_denoiser(checkpoint: Path, fresh: torch.nn.Module) -> torch.nn.Module:
    """The UNet to resume `checkpoint` with: the one its denoiser.json records, so a run started under an
    earlier preset (no attention below the middle block) continues as it began; `fresh` (the config's)
    where the checkpoint holds no record. A record whose weight shapes differ from the config's is refused."""
    from diffusers import UNet2DModel

    meta = read_denoiser(checkpoint / DENOISER_NAME)
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
    if force:
        return
    saved = saved_config(Path(run_dir) / CONFIG_NAME)
    if saved is None:
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
        """Model, optimizer, scaler and RNG state from `path`; returns its trainer state. A checkpoint
        whose files are damaged is one line naming it, what is wrong and what to do."""
        try:
            state = read_state(path / STATE_NAME) or {}
            saved_config(path / CONFIG_NAME)
            rng = broken_pickle(path, "random_states")  # accelerate would log it and resume with other random streams
            if rng:
                raise UserError(rng)
            try:
                self.accelerator.load_state(str(path))
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile):
                # torch's own messages advise weights_only=False (running the file's code): never shown
                raise UserError(broken_pickle(path) or "accelerate's files in it do not load") from None
        except UserError as e:
            older = [p for _, p in list_checkpoints(path.parent.parent) if p.name < path.name]
            instead = f"resume={older[-1]}" if older else "start again in a new run_dir"
            raise UserError(
                f"cannot resume from checkpoint {path}: {e}; remove that checkpoint, or {instead}"
            ) from None
        self.last_saved = state.get("step")
        return state

    def maybe_save(self, step: int, state: Callable[[], dict[str, Any]]) -> Path | None:
        """`save` at every `every`th step. `state` is called only then: gathering it reduces across ranks."""
        return self.save(step, state()) if step % self.every == 0 else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Every rank calls this at the same step. A failed write (disk full) keeps the previous checkpoint."""
        acc = self.accelerator
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + UNFINISHED_SUFFIX)
        # rank 0 makes the folder every rank saves into; a link planted at its name (or a checkpoints/
        # that is a link) is refused on every rank before any writes, which would follow it
        unsafe: UnsafePath | None = None
        if acc.is_main_process:
            try:
                fresh_dir(tmp, root=self.root.parent)
            except UnsafePath as e:
                unsafe = e
        if acc.reduce(torch.tensor(float(unsafe is not None), device=acc.device), "sum").item():
            raise unsafe or UnsafePath(f"could not write checkpoint {final}: refused on the main process")
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
                remove_tree(tmp)
            kept = latest_checkpoint(self.root.parent)
            why = f"{type(error).__name__}: {error}" if error else "failed on another rank"
            raise UserError(f"could not write checkpoint {final} ({why}); kept {kept or 'no earlier checkpoint'}")
        if acc.is_main_process:
            if final.exists() or final.is_symlink():  # the same step saved again (a resumed run with nothing left)
                remove_tree(final)
            tmp.replace(final)
            self._prune()
        acc.wait_for_everyone()
        self.last_saved = step
        return final

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root.parent)[: -self.keep]:
            remove_tree(path)
        for leftover in self.root.glob("step-*" + UNFINISHED_SUFFIX):  # from a run killed while saving
            remove_tree(leftover)

"""This module checks and sets up what training needs before its first step.

The device it was promised, the world size, loader workers, W&B credentials, trackers, and glibc's
memory setting on CPU."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import netrc
import os
import sys
import uuid
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from artscale.core.atomic import write_atomic
from artscale.core.errors import UserError
from artscale.core.hardware import (
    Precision,
    choose_precision,
    cpu_native_bf16,
    cuda_bf16,
    driver_verdict,
    nvidia_driver,
)
from artscale.core.system import usable_cores
from artscale.data.store import is_url
from artscale.train.config import TrainConfig

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def _use_cpu(env: Mapping[str, str]) -> bool:
    return env.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE


def gpus_asked_for(env: Mapping[str, str]) -> str:
    """Why this process is meant to run on a GPU, in words ("" when nothing asked for one).
    `ACCELERATE_USE_CPU=1` (2 gloo CPU ranks, the tests' launch line) asks for CPU."""
    if _use_cpu(env):
        return ""
    if int(env.get("SLURM_GPUS_ON_NODE", "0") or 0) > 0:
        return f"SLURM_GPUS_ON_NODE={env['SLURM_GPUS_ON_NODE']}"
    if int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return f"WORLD_SIZE={env['WORLD_SIZE']} without ACCELERATE_USE_CPU=1 (a multi-GPU launch)"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        return f"CUDA_VISIBLE_DEVICES={visible}"
    return ""


def check_gpu(env: Mapping[str, str], cuda_available: bool) -> None:
    """Never fall back to CPU in silence: GPUs asked for and no CUDA device is one line, exit 2."""
    why = gpus_asked_for(env)
    if why and not cuda_available:
        driver = nvidia_driver()
        verdict = driver_verdict(driver.version, torch.version.cuda)
        raise UserError(
            f"GPUs were asked for ({why}) but torch sees no CUDA device: torch {torch.__version__} is built for "
            f"CUDA {torch.version.cuda or 'none (a CPU-only build)'}; {driver.summary}"
            f"{'; ' + verdict.text if verdict.ok is False and driver.version else ''}. `artscale doctor --need cuda` names the fix "
            "(CUDA 12 drivers: docs/install.md), or run on CPU with ACCELERATE_USE_CPU=1"
        )


def check_world(env: Mapping[str, str], num_processes: int) -> None:
    """The launcher's WORLD_SIZE and the process group's size must agree: a rank that fell back to
    a non-distributed mode would train alone and write into the shared run dir as a main process."""
    launched = int(env.get("WORLD_SIZE", "1") or 1)
    if launched != num_processes:
        raise UserError(
            f"the launcher started {launched} processes (WORLD_SIZE) but this one trains in a group of {num_processes}: "
            "check the accelerate config and that every node sees its GPUs"
        )


def loader_workers(cfg_workers: int, device_type: str, local_processes: int, cores: int | None = None) -> int:
    """num_workers=-1: none on CPU (a worker only takes cores from the step), on a GPU up to 4 per
    process, dividing this node's usable cores (`cores`, default: this process's) among its processes."""
    if cfg_workers >= 0:
        return cfg_workers
    cores = usable_cores() if cores is None else cores
    return 0 if device_type == "cpu" else min(4, cores // max(1, local_processes))


def wandb_has_credentials(env: Mapping[str, str]) -> bool:
    """What wandb itself reads: WANDB_API_KEY, an identity token file, or the key `wandb login` put
    in ~/.netrc (or $NETRC) for the W&B host."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc or "api.wandb.ai"
    path = Path(env.get("NETRC") or Path(env.get("HOME", str(Path.home()))) / ".netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(env: Mapping[str, str]) -> str | None:
    """The WANDB_MODE to set: offline only when the user chose none and wandb has no credentials."""
    if env.get("WANDB_MODE") or wandb_has_credentials(env):
        return None
    return "offline"


def precision_for(cfg: TrainConfig) -> Precision:
    """The precision this process trains in: `auto` decided by this machine's CPU or GPU."""
    cuda = torch.cuda.is_available() and not _use_cpu(os.environ)
    gpu_bf16 = cuda and cuda_bf16()
    return choose_precision(cfg.mixed_precision, "cuda" if cuda else "cpu", cpu_native_bf16(), gpu_bf16)


def accelerator(cfg: TrainConfig, run_dir: Path, precision: Precision) -> Any:
    from accelerate import Accelerator, InitProcessGroupKwargs

    check_gpu(os.environ, torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision=fp16 needs a GPU; on CPU use auto, bf16 or no")
    if cfg.tracker == "wandb" and (mode := wandb_mode(os.environ)):
        os.environ["WANDB_MODE"] = mode  # wandb 0.31 raises at init with no credentials and no mode
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(
                f"tracker=wandb: no W&B credentials (WANDB_API_KEY or `wandb login`): logging offline to "
                f"{run_dir / 'wandb'} (upload later with `wandb sync`)",
                file=sys.stderr,
                flush=True,
            )
    acc = Accelerator(
        mixed_precision=precision.mode,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.tracker == "none" else [cfg.tracker],
        project_dir=str(run_dir),
        # compile=true: accelerate compiles after wrapping in DDP, so dynamo's DDPOptimizer splits the graph at
        # DDP's buckets and gradients are all-reduced while the backward runs; a compiled module wrapped in DDP
        # makes its gradients at the end of one compiled backward, then waits for all of them to be reduced.
        # False leaves accelerate's own setting (`accelerate launch --dynamo_backend`, default no).
        dynamo_backend="inductor" if cfg.compile else None,
        # A rank waiting on a dead or finished peer fails after this instead of hanging for 30 min.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.pg_timeout_s))],
    )
    check_world(os.environ, acc.num_processes)
    return acc


def adam(params: Any, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused on CUDA: one kernel for all parameters, and under fp16 the GradScaler hands it the
    overflow check as a device tensor (`_step_supports_amp_scaling`) instead of reading it with
    `.item()` on the host every step (torch.amp.GradScaler.step)."""
    return torch.optim.Adam(params, lr=lr, fused=torch.device(device).type == "cuda")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    A CPU step frees and reallocates activations of tens of MB. glibc serves those with mmap and
    unmaps them on free, so every step faults them in again, zeroed, page by page, in the kernel
    (bench/train_step.py shows the difference).
    Returns False where the C library is not glibc (nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (musl has no such symbol)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local data, VGG and Inception paths made absolute: the saved config then means the same from any directory."""
    fixed = {
        k: str(Path(v).expanduser().resolve())
        for k in ("data", "vgg_weights", "eval_inception", "teacher")
        if (v := getattr(cfg, k)) not in ("", "imagenet", "random")
        and not is_url(v)  # s3://b/x is no path, even where an old local folder `s3:` exists
        and Path(v).expanduser().exists()
    }
    return dataclasses.replace(cfg, **fixed)


def _wandb_id(acc: Any, run_dir: Path) -> str | None:
    """One W&B run id per run dir, so a resumed run continues the same W&B run (main process only)."""
    if not acc.is_main_process:
        return None
    path = run_dir / "wandb_id"
    if not path.is_file():
        write_atomic(path, uuid.uuid4().hex[:12] + "\n")
    return path.read_text().strip()


def start_trackers(acc: Any, cfg: TrainConfig, run_dir: Path) -> None:
    if cfg.tracker == "none":
        return
    flat = {
        k: (",".join(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items()
    }  # tensorboard hparams take no lists
    wandb_kwargs = {
        "name": cfg.run_name or run_dir.name,
        "tags": cfg.tags,
        "id": _wandb_id(acc, run_dir),
        "resume": "allow",
        "dir": str(run_dir),
    }  # accelerate's wandb tracker ignores project_dir: without `dir` files land in the cwd
    acc.init_trackers(
        cfg.wandb_project, config=flat, init_kwargs={"wandb": wandb_kwargs} if cfg.tracker == "wandb" else {}
    )

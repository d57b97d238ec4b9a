"""Training on accelerate: one code path for `artscale train` and `accelerate launch launch/train.py`,
on one CPU, one GPU, many GPUs or many nodes.

A step is an optimizer step everywhere: logs, lr schedule, checkpoints, resume. Rank checks live
in the helpers (Progress, Samples, CheckpointManager), not in the loop.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from artscale import usable_cores
from artscale.atomic import write_atomic, write_json_atomic
from artscale.checkpoint import (
    CONFIG_NAME,
    CheckpointManager,
    check_run_dir,
    resume_point,
    save_final,
)
from artscale.config import TrainConfig, load_config
from artscale.errors import UserError
from artscale.images import encode_image
from artscale.loader import DataSpec, data_spec, train_loader, val_loader
from artscale.losses import HybridLoss
from artscale.model import ConvDiffusionModel, normalize

log = logging.getLogger(__name__)

# Exit code after a stop signal (SIGTERM, SIGUSR1, a first SIGINT) once the checkpoint is written:
# EX_TEMPFAIL, "try again". Run the same command again (SLURM: requeue) and it resumes.
EXIT_PREEMPTED = 75
NOMINAL_EPOCH_STEPS = 1000  # an "epoch" for a bare URL pattern, where no manifest gives the count


@dataclass
class Plan:
    """How many steps, and the lr at each: pure functions of the config, the data and the world size."""

    world: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    lr: float
    lr_step: int  # steps between lr drops: the article's StepLR(30 epochs), in optimizer steps
    gamma: float

    @classmethod
    def make(cls, cfg: TrainConfig, spec: DataSpec, world: int) -> Plan:
        global_batch = cfg.batch_size * world * cfg.grad_accum
        if spec.train_count is None:
            if cfg.max_steps == 0:
                raise UserError(f"data={cfg.data} has no manifest to count an epoch: set max_steps")
            per_epoch = NOMINAL_EPOCH_STEPS
        else:
            per_epoch = max(1, spec.train_count // global_batch)
        total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
        lr = cfg.lr * (world * cfg.grad_accum if cfg.scale_lr else 1)
        return cls(
            world, global_batch, per_epoch, total, lr, max(1, round(cfg.lr_step_epochs * per_epoch)), cfg.lr_gamma
        )

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.lr_step)


class StopSignals:
    """SIGTERM or SIGUSR1 (preemption, `scancel --signal`) or a first SIGINT: finish the step,
    checkpoint, exit EXIT_PREEMPTED. A second SIGINT exits at once."""

    def __init__(self) -> None:
        self.requested = ""
        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request)
        signal.signal(signal.SIGINT, self._interrupt)

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():  # the demo goes on after training: Ctrl-C must act normally again
            signal.signal(sig, handler)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or signal.Signals(signum).name

    def _interrupt(self, signum: int, frame: Any) -> None:
        if self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = "SIGINT"


class Progress:
    """Sums this rank's losses; each step one all-reduce agrees on stop requests and skipped
    samples; every `log_every` steps the losses are reduced across ranks and the main process
    logs them (trackers, metrics.jsonl, the tqdm bar)."""

    def __init__(self, acc: Any, cfg: TrainConfig, plan: Plan, start: int, state: dict[str, Any]) -> None:
        self.acc, self.cfg, self.plan = acc, cfg, plan
        self.skipped = int(state.get("skipped_samples", 0))
        self.sums = torch.zeros(4, device=acc.device)  # loss, mse, perceptual, micro-batches
        self.wait_s, self.window_start, self.window_steps = 0.0, time.perf_counter(), 0
        self.local_skips = 0
        self.metrics_file = Path(cfg.run_dir) / "metrics.jsonl"
        self.bar = tqdm(total=plan.total_steps, initial=start, disable=not acc.is_main_process, dynamic_ncols=True)

    def next_batch(self, data: Iterator) -> torch.Tensor:
        t = time.perf_counter()
        images, skipped = next(data)
        self.wait_s += time.perf_counter() - t
        self.local_skips += skipped
        return images

    def add(self, loss: torch.Tensor, mse: torch.Tensor, perceptual: torch.Tensor) -> None:
        self.sums += torch.stack(
            [
                loss.detach().float(),
                mse.detach().float(),
                perceptual.detach().float(),
                loss.new_ones((), dtype=torch.float32),
            ]
        )

    def end_step(self, step: int, stop: str, lr: float, grad_norm: torch.Tensor | None) -> bool:
        """Returns True when any rank was asked to stop."""
        agreed = self.acc.reduce(
            torch.tensor([float(bool(stop)), float(self.local_skips)], device=self.acc.device), "sum"
        )
        self.local_skips = 0
        self.skipped += int(agreed[1].item())
        self.window_steps += 1
        self.bar.update(1)
        if step % self.cfg.log_every == 0 or step == self.plan.total_steps or agreed[0] > 0:
            self._log(step, lr, grad_norm)
        return bool(agreed[0] > 0)

    def _log(self, step: int, lr: float, grad_norm: torch.Tensor | None) -> None:
        sums = self.acc.reduce(torch.cat([self.sums, self.sums.new_tensor([self.wait_s])]), "sum")
        elapsed = time.perf_counter() - self.window_start
        n = max(sums[3].item(), 1.0)
        metrics = {
            "loss": sums[0].item() / n,
            "mse": sums[1].item() / n,
            "perceptual": sums[2].item() / n,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "img_per_s": self.plan.global_batch * self.window_steps / max(elapsed, 1e-9),
            "data_wait_s": sums[4].item() / self.plan.world / self.window_steps,
            "skipped_samples": self.skipped,
            "epoch": step / self.plan.steps_per_epoch,
        }
        self.log(step, metrics)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2g}", img_s=f"{metrics['img_per_s']:.1f}")
        self.sums.zero_()
        self.wait_s, self.window_start, self.window_steps = 0.0, time.perf_counter(), 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Already reduced metrics, from every rank: the trackers and metrics.jsonl get them once."""
        self.acc.log(metrics, step=step)
        if self.acc.is_main_process:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def state(self) -> dict[str, Any]:
        return {
            "skipped_samples": self.skipped,
            "world_size": self.plan.world,
            "global_batch": self.plan.global_batch,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "total_steps": self.plan.total_steps,
        }

    def close(self) -> None:
        self.bar.close()


def _batches(spec: DataSpec, cfg: TrainConfig, plan: Plan, acc: Any, start: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Endless (images on the device, skipped) for this rank, starting at the exact batch of step `start`.

    Each epoch is its own loader (its seeds make resume exact). The next epoch's loader is started
    halfway through the current one, so its workers start and prefetch while this epoch trains:
    with a small collection on many GPUs an epoch lasts seconds, and a worker restart at every
    epoch boundary would stall each one."""
    per_epoch = plan.steps_per_epoch * cfg.grad_accum
    epoch, done = divmod(start * cfg.grad_accum, per_epoch)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def epoch_batches(epoch: int, skip: int) -> Iterator:
        return iter(
            train_loader(
                spec,
                batch_size=cfg.batch_size,
                batches=per_epoch,
                seed=cfg.seed,
                epoch=epoch,
                rank=acc.process_index,
                num_workers=cfg.num_workers,
                skip=skip,
                hflip=cfg.hflip,
            )
        )

    current = epoch_batches(epoch, done)
    while True:
        upcoming = None
        for i, (images, _, skipped) in enumerate(current):
            if upcoming is None and i >= (per_epoch - done) // 2:
                upcoming = epoch_batches(epoch + 1, 0)
            yield images.to(acc.device, non_blocking=True).contiguous(memory_format=fmt), skipped
        current = upcoming or epoch_batches(epoch + 1, 0)
        epoch, done = epoch + 1, 0


def evaluate(
    net: torch.nn.Module, loss_fn: HybridLoss, spec: DataSpec, cfg: TrainConfig, acc: Any
) -> dict[str, float] | None:
    """Val MSE, perceptual loss, PSNR and SSIM: each rank its own part, summed across ranks."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    loader = val_loader(
        spec, batch_size=cfg.batch_size, rank=acc.process_index, world=acc.num_processes, num_workers=cfg.num_workers
    )
    if loader is None:
        return None
    sums = torch.zeros(6, dtype=torch.float64)  # mse, perceptual, psnr, ssim, images, skipped
    net.eval()
    with torch.no_grad():
        for i, (images, _, skipped) in enumerate(loader):
            if cfg.val_batches and i >= cfg.val_batches:
                break
            x = images.to(acc.device)
            with acc.autocast():
                out = net(normalize(x))
                _, mse, perceptual = loss_fn(out, x)
            out, n = out.float().clamp(0, 1), x.shape[0]
            psnr = peak_signal_noise_ratio(out, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
            ssim = structural_similarity_index_measure(
                out, x, data_range=1.0, reduction="none", kernel_size=min(11, cfg.image_size - 1)
            )
            sums += torch.tensor(
                [mse.item() * n, perceptual.item() * n, psnr.sum().item(), ssim.sum().item(), n, skipped],
                dtype=torch.float64,
            )
    net.train()
    sums = acc.reduce(sums.to(acc.device), "sum").cpu()
    n = sums[4].item()
    if n == 0:
        return None
    return {
        "val/mse": sums[0].item() / n,
        "val/perceptual": sums[1].item() / n,
        "val/psnr": sums[2].item() / n,
        "val/ssim": sums[3].item() / n,
        "val/images": n,
        "val/skipped": sums[5].item(),
    }


class Samples:
    """Input | output grids of fixed images, as PNG under run_dir/samples/ and to the trackers (main process)."""

    def __init__(self, acc: Any, spec: DataSpec, cfg: TrainConfig) -> None:
        self.acc, self.dir = acc, Path(cfg.run_dir) / "samples"
        self.images = None
        if acc.is_main_process:
            source = val_loader(spec, batch_size=8, rank=0, world=1) or train_loader(
                spec, batch_size=8, batches=1, seed=cfg.seed, epoch=0, rank=0
            )
            self.images = next(iter(source), (None,))[0]

    def write(self, step: int, net: torch.nn.Module) -> Path | None:
        if not self.acc.is_main_process or self.images is None:
            return None
        from torchvision.utils import make_grid

        net.eval()
        with torch.no_grad(), self.acc.autocast():
            out = net(normalize(self.images.to(self.acc.device))).float().clamp(0, 1).cpu()
        net.train()
        grid = make_grid(torch.stack([self.images, out], 1).flatten(0, 1), nrow=2, padding=2, pad_value=1.0)
        im = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:06d}.png"
        write_atomic(path, encode_image(im, "png"))
        for tracker in self.acc.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.tracker.log({"samples": wandb.Image(im, caption="input | output")}, step=step)
            elif tracker.name == "tensorboard":
                tracker.tracker.add_image("samples", np.asarray(im), step, dataformats="HWC")
        return path


def _accelerator(cfg: TrainConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator, InitProcessGroupKwargs

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision=fp16 needs a GPU; on CPU use bf16 (or no)")
    if cfg.tracker == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # wandb 0.31 raises at init with no key and no mode
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.tracker == "none" else [cfg.tracker],
        project_dir=str(run_dir),
        # A rank waiting on a dead or finished peer fails after this instead of hanging for 30 min.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.pg_timeout_s))],
    )


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    A CPU step frees and reallocates activations of 30-130 MB. glibc serves those with mmap and
    unmaps them on free, so every step faults them in again, zeroed, page by page: measured here
    as 19% of a bf16 step's CPU time spent in the kernel, and 12 -> 14.7 img/s once kept.
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


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local data and VGG paths made absolute: the saved config then means the same from any directory."""
    fixed = {
        k: str(Path(v).expanduser().resolve())
        for k in ("data", "vgg_weights")
        if (v := getattr(cfg, k)) not in ("imagenet", "random") and Path(v).expanduser().exists()
    }
    return dataclasses.replace(cfg, **fixed)


def _wandb_id(acc: Any, run_dir: Path) -> str | None:
    """One W&B run id per run dir, so a resumed run continues the same W&B run (main process only)."""
    if not acc.is_main_process:
        return None
    path = run_dir / "wandb_id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12] + "\n")
    return path.read_text().strip()


def _start_trackers(acc: Any, cfg: TrainConfig, run_dir: Path) -> None:
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


def train(cfg: TrainConfig) -> int:
    """Train until the plan's last step (returns 0) or a stop signal (checkpoints, returns EXIT_PREEMPTED)."""
    with StopSignals() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopSignals) -> int:
    from accelerate.utils import set_seed

    cfg = _absolute_paths(cfg)
    spec = data_spec(cfg.data, cfg.image_size)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, cfg.to_dict(), cfg.force)
    resume_from = resume_point(run_dir, cfg.resume)
    acc = _accelerator(cfg, run_dir)
    if acc.device.type == "cpu":
        keep_freed_memory()
    if cfg.num_workers < 0:
        cfg = dataclasses.replace(cfg, num_workers=0 if acc.device.type == "cpu" else min(4, usable_cores()))
    plan = Plan.make(cfg, spec, acc.num_processes)
    set_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True  # one input shape for the whole run: pick the fastest conv kernels once
    net = ConvDiffusionModel().to(acc.device)
    with acc.main_process_first():  # only the main process downloads VGG weights
        loss_fn = HybridLoss(cfg.vgg_weights, cfg.perceptual_weight).to(acc.device)
    if cfg.channels_last:
        net, loss_fn = net.to(memory_format=torch.channels_last), loss_fn.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=plan.lr_at(0))
    model, optimizer = acc.prepare(torch.compile(net) if cfg.compile else net, optimizer)
    ckpt = CheckpointManager(acc, run_dir, cfg.to_dict(), net, cfg.checkpoint_every, cfg.keep_checkpoints)
    state = ckpt.load(resume_from) if resume_from else {}
    start = int(state.get("step", 0))
    if start > plan.total_steps:
        raise UserError(
            f"{resume_from} is at step {start}, past this run's last step {plan.total_steps}: raise max_steps or epochs"
        )
    if resume_from:
        acc.print(f"resumed from step {start} ({resume_from})")
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / CONFIG_NAME, cfg.to_dict())
    acc.print(
        f"world size {plan.world}, global batch {plan.global_batch} ({cfg.batch_size} per process x {plan.world} "
        f"processes x grad_accum {cfg.grad_accum}); steps {start} -> {plan.total_steps} ({plan.steps_per_epoch} per epoch), "
        f"lr {plan.lr:g} x{plan.gamma:g} every {plan.lr_step} steps; device {acc.device}, mixed precision {cfg.mixed_precision}"
    )
    _start_trackers(acc, cfg, run_dir)
    progress, samples = Progress(acc, cfg, plan, start, state), Samples(acc, spec, cfg)
    data = _batches(spec, cfg, plan, acc, start)
    model.train()
    for step in range(start, plan.total_steps):
        lr = plan.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            images = progress.next_batch(data)
            with acc.accumulate(model):
                output = model(normalize(images))
                with acc.autocast():
                    loss, mse, perceptual = loss_fn(output, images)
                acc.backward(loss)
                grad_norm = (
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                    if acc.sync_gradients
                    else None
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress.add(loss, mse, perceptual)
        done = step + 1
        stopping = progress.end_step(done, stop.requested, lr, grad_norm)
        if done % cfg.val_every == 0 or done == plan.total_steps:
            metrics = evaluate(net, loss_fn, spec, cfg, acc)
            if metrics:
                progress.log(done, metrics)
        if done % cfg.sample_every == 0 or done == plan.total_steps:
            samples.write(done, net)
        if stopping:
            path = ckpt.save(done, progress.state())
            acc.print(
                f"stopped by a signal at step {done}: saved {path}; run the same command again to resume (exit {EXIT_PREEMPTED})"
            )
            progress.close()
            acc.end_training()
            return EXIT_PREEMPTED
        ckpt.maybe_save(done, progress.state())
    progress.close()
    if ckpt.last_saved != plan.total_steps:
        ckpt.save(plan.total_steps, progress.state())
    if acc.is_main_process:
        save_final(net.state_dict(), run_dir, cfg.to_dict(), plan.total_steps)
    acc.wait_for_everyone()
    acc.print(
        f"done: step {plan.total_steps}, final weights in {run_dir / 'final'} (skipped samples: {progress.skipped})"
    )
    print(f"rank {acc.process_index}/{plan.world} finished at step {plan.total_steps}", flush=True)
    acc.end_training()
    return 0


def main(argv: list[str]) -> int:
    """`[--config FILE] [key=value ...]` -> train; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="artscale train", description="train (same code as accelerate launch launch/train.py)"
    )
    parser.add_argument("--config", default=None, help="a YAML file of config keys")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config keys (see the README); override the file"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return train(load_config(args.config, args.overrides))

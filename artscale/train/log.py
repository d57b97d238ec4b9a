"""What training reports: step metrics (trackers, metrics.jsonl, progress lines), validation, sample grids.

No host sync in a step: losses are summed on the device and reduced across ranks at log steps
only; ranks agree on a stop request at log steps and every STOP_CHECK_EVERY steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artscale.contracts.run_files import read_metrics
from artscale.core.atomic import append_text, write_atomic
from artscale.core.progress import Progress
from artscale.data.grids import grid_image
from artscale.data.images import encode_image
from artscale.data.loader import DataSpec, train_loader, val_loader
from artscale.models.article import normalize
from artscale.train.config import TrainConfig

# With several processes a stop signal (SIGTERM, SIGUSR1, Ctrl-C) is acted on at the next log step
# or the next multiple of this many steps, whichever comes first: agreeing costs one all-reduce.
STOP_CHECK_EVERY = 10


def to_device(images: torch.Tensor, device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    """A uint8 batch from the loader to float [0, 1] on the device (a quarter of the bytes cross over)."""
    return images.to(device, non_blocking=True).float().div_(255).contiguous(memory_format=fmt)


def rewind_metrics(run_dir: Path, step: int, wandb: bool) -> None:
    """Keep metrics.jsonl's entries up to `step`: a run resumed from there logs the later ones
    again (a crash came after they were logged), and a torn last line from a killed run goes too.
    W&B cannot take them back (its steps only grow; rewinding a run is an online-only beta): say which."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    entries = read_metrics(path)
    kept = [m for m in entries if m.get("step", 0) <= step]
    if len(kept) == len(lines):
        return
    write_atomic(path, "".join(json.dumps(m) + "\n" for m in kept))
    later = sorted({m["step"] for m in entries if m.get("step", 0) > step})
    steps = f"steps {later[0]}..{later[-1]}" if later else ""
    torn = f"{len(lines) - len(entries)} unreadable line" if len(lines) > len(entries) else ""
    dropped = ", ".join(x for x in (steps and f"{steps} from the interrupted run", torn) if x)
    print(f"metrics.jsonl: dropped {dropped} (logged again from step {step + 1})", file=sys.stderr)
    if wandb and steps:
        print(
            f"W&B keeps its values for the {steps} and ignores this run's for them (W&B steps only grow): "
            "metrics.jsonl holds the run as resumed",
            file=sys.stderr,
        )


class StepLog:
    """Sums this rank's losses on the device; at log steps the sums are reduced across ranks and
    the main process logs them (trackers, metrics.jsonl, a progress line or bar)."""

    def __init__(
        self,
        acc: Any,
        cfg: TrainConfig,
        plan: Any,
        start: int,
        state: dict[str, Any],
        names: tuple[str, ...] = ("mse", "perceptual"),
    ) -> None:
        self.acc, self.cfg, self.plan, self.names = acc, cfg, plan, names
        self.skipped = int(state.get("skipped_samples", 0))
        self.sums = torch.zeros(len(names) + 2, device=acc.device)  # loss, the objective's parts, micro-batches
        self.wait_s, self.window_start, self.window_steps = 0.0, time.perf_counter(), 0
        self.local_skips = 0
        self.metrics_file = Path(cfg.run_dir) / "metrics.jsonl"
        self.progress = Progress(plan.total_steps, "train", unit="step", initial=start, enabled=acc.is_main_process)

    def next_batch(self, data: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) still on the host, as the loader made them."""
        t = time.perf_counter()
        images, labels, _, skipped = next(data)
        self.wait_s += time.perf_counter() - t
        self.local_skips += skipped
        return images, labels

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        values = [loss.detach().float(), *(parts[n].detach().float() for n in self.names)]
        self.sums += torch.stack([*values, loss.new_ones((), dtype=torch.float32)])

    def _reduce(self, stop: str) -> list[float]:
        """Sums, stop requests, skips and data wait over all ranks: the one host sync, at log and stop-check steps."""
        local = torch.tensor([float(bool(stop)), float(self.local_skips), self.wait_s], dtype=torch.float32)
        totals = self.acc.reduce(torch.cat([self.sums, local.to(self.sums.device)]), "sum").tolist()
        self.local_skips = 0
        self.skipped += int(totals[len(self.sums) + 1])
        return totals

    def end_step(self, step: int, stop: str, lr: float, grad_norm: torch.Tensor | None) -> bool:
        """Returns True when the ranks agree to stop (some rank was asked to)."""
        self.window_steps += 1
        self.progress.update(1)
        log_now = step % self.cfg.log_every == 0 or step == self.plan.total_steps
        if not log_now and (step % STOP_CHECK_EVERY if self.plan.world > 1 else not stop):
            return False
        totals = self._reduce(stop)
        stopping = totals[len(self.sums)] > 0
        if log_now or stopping:
            self._log(step, lr, grad_norm, totals)
        return stopping

    def _log(self, step: int, lr: float, grad_norm: torch.Tensor | None, totals: list[float]) -> None:
        elapsed = time.perf_counter() - self.window_start
        k = len(self.sums)  # totals: loss, the parts, micro-batches, then stop, skips, data wait
        n = max(totals[k - 1], 1.0)
        metrics = {
            "loss": totals[0] / n,
            **{name: totals[1 + i] / n for i, name in enumerate(self.names)},
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "img_per_s": self.plan.global_batch * self.window_steps / max(elapsed, 1e-9),
            "data_wait_s": totals[k + 2] / self.plan.world / self.window_steps,
            "skipped_samples": self.skipped,
            "epoch": step / self.plan.steps_per_epoch,
        }
        self.log(step, metrics)
        self.progress.set_postfix(loss=metrics["loss"], lr=lr, img_s=round(metrics["img_per_s"], 1))
        self.sums.zero_()
        self.wait_s, self.window_start, self.window_steps = 0.0, time.perf_counter(), 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Already reduced metrics, from every rank: the trackers and metrics.jsonl get them once."""
        self.acc.log(metrics, step=step)
        if self.acc.is_main_process:
            append_text(self.metrics_file, json.dumps({"step": step, **metrics}) + "\n", sync=False)

    def state(self) -> dict[str, Any]:
        """The trainer state a checkpoint keeps (every rank calls this at the same step)."""
        self._reduce("")
        return {
            "skipped_samples": self.skipped,
            "world_size": self.plan.world,
            "global_batch": self.plan.global_batch,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "total_steps": self.plan.total_steps,
        }

    def close(self) -> None:
        self.progress.close()


def validate(
    net: torch.nn.Module, objective: Any, spec: DataSpec, cfg: TrainConfig, acc: Any
) -> dict[str, float] | None:
    """The objective's val figures (artscale.train.objectives), each rank its own part, summed across ranks, per image."""
    loader = val_loader(
        spec, batch_size=cfg.batch_size, rank=acc.process_index, world=acc.num_processes, num_workers=cfg.num_workers
    )
    if loader is None:
        return None
    share = math.ceil((spec.val_count or 0) / acc.num_processes) or None
    if share and cfg.val_batches:
        share = min(share, cfg.val_batches * cfg.batch_size)
    names = objective.val_names
    sums = torch.zeros(len(names), dtype=torch.float64, device=acc.device)
    images_seen, skips = 0, 0
    was_training = net.training
    net.eval()
    with torch.no_grad(), Progress(share, "val", enabled=acc.is_main_process) as progress:
        for i, (images, labels, keys, skipped) in enumerate(loader):
            if cfg.val_batches and i >= cfg.val_batches:
                break
            x = to_device(images, acc.device, torch.contiguous_format)
            part = objective.val_sums(net, x, labels.to(acc.device), keys)
            sums += torch.stack([torch.as_tensor(part[k], dtype=torch.float64, device=acc.device) for k in names])
            images_seen, skips = images_seen + x.shape[0], skips + skipped
            progress.update(x.shape[0])
    net.train(was_training)
    counts = torch.tensor([images_seen, skips], dtype=torch.float64).to(acc.device)
    totals = acc.reduce(torch.cat([sums, counts]), "sum").tolist()
    n = totals[-2]
    if n == 0:
        return None
    return {**{f"val/{k}": totals[i] / n for i, k in enumerate(names)}, "val/images": n, "val/skipped": totals[-1]}


class Samples:
    """Sample grids as PNG under run_dir/samples/ and to the trackers (main process): input | output of fixed
    images for the article's objective, new images from fixed noise (one row per class) for diffusion."""

    def __init__(self, acc: Any, spec: DataSpec, cfg: TrainConfig, objective: Any = None) -> None:
        self.acc, self.dir = acc, Path(cfg.run_dir) / "samples"
        self.chunk = cfg.batch_size  # images sampled at once: memory a training batch's activations already needed
        self.images = None
        self.grid = getattr(objective, "grid", None)  # diffusion: new images, one row per class
        if acc.is_main_process and self.grid is None:
            source = val_loader(spec, batch_size=8, rank=0, world=1) or train_loader(
                spec, batch_size=8, epoch_batches=1, seed=cfg.seed, rank=0
            )
            batch = next(iter(source), None)
            self.images = None if batch is None else batch[0].float().div(255)

    def write(self, step: int, net: torch.nn.Module) -> Path | None:
        if not self.acc.is_main_process or (self.images is None and self.grid is None):
            return None
        was_training = net.training
        net.eval()
        if self.grid is not None:
            images, columns = self.grid(net, chunk=self.chunk)
            caption = "one row per class"
        else:
            with torch.no_grad(), self.acc.autocast():
                out = net(normalize(self.images.to(self.acc.device))).float().clamp(0, 1).cpu()
            images, columns, caption = torch.stack([self.images, out], 1).flatten(0, 1), 2, "input | output"
        net.train(was_training)
        im = grid_image(images, columns)  # small pieces enlarged (grids.py): judged by eye
        path = self.dir / f"step-{step:06d}.png"
        write_atomic(path, encode_image(im, "png"), root=self.dir.parent)  # samples/ made, never followed
        for tracker in self.acc.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.tracker.log({"samples": wandb.Image(im, caption=caption)}, step=step)
            elif tracker.name == "tensorboard":
                tracker.tracker.add_image("samples", np.asarray(im), step, dataformats="HWC")
        return path

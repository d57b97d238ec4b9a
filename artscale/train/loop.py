"""This module is the training loop on accelerate, one code path for every way training starts.

`artscale train`, `python -m artscale.train`, `accelerate launch -m artscale.train` and
`accelerate launch launch/train.py` run it, on one CPU, one GPU, many GPUs or many nodes.

A step is an optimizer step everywhere: logs, lr schedule, checkpoints, resume. Rank checks live
in the helpers (StepLog, Samples, CheckpointManager: log.py, checkpoint.py), not in the loop;
what is checked and set up before the first step is in setup.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from artscale.contracts.run_dir import CONFIG_NAME, DENOISER_NAME, EMA_NAME
from artscale.core.atomic import write_json_atomic
from artscale.core.errors import UserError
from artscale.data.loader import DataSpec, data_spec, train_loader
from artscale.models.article import ConvDiffusionModel
from artscale.models.state_dict import read_state_dict
from artscale.train.checkpoint import CheckpointManager, check_run_dir, save_final, shared_resume_point
from artscale.train.config import TrainConfig, load_config, train_parser
from artscale.train.ema import Ema
from artscale.train.log import Samples, StepLog, rewind_metrics, to_device, validate
from artscale.train.losses import HybridLoss
from artscale.train.objectives import Diffusion, Reconstruct
from artscale.train.quality import Evals
from artscale.train.setup import (
    absolute_paths,
    accelerator,
    adam,
    keep_freed_memory,
    loader_workers,
    precision_for,
    start_trackers,
)

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
    schedule: str = "step"  # step | cosine (config lr_schedule)
    warmup: int = 0  # steps of linear warm-up before the schedule

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
        lr_step = max(1, round(cfg.lr_step_epochs * per_epoch))
        return cls(world, global_batch, per_epoch, total, lr, lr_step, cfg.lr_gamma, cfg.lr_schedule, cfg.warmup_steps)

    def factor(self, step: int) -> float:
        """lr_at(step) / lr: what torch's LambdaLR multiplies the base lr by at optimizer step `step`."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0  # step 0 already moves
        if self.schedule == "cosine":
            progress = min(1.0, max(0, step - self.warmup) / max(1, self.total_steps - self.warmup))
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        return warm * self.gamma ** (step // self.lr_step)

    def lr_at(self, step: int) -> float:
        return self.lr * self.factor(step)

    def describe(self) -> str:
        """The schedule in the start line's words."""
        warm = f" after {self.warmup} warm-up steps" if self.warmup else ""
        if self.schedule == "cosine":
            return f"lr {self.lr:g}, cosine to 0 at step {self.total_steps}{warm}"
        return f"lr {self.lr:g} x{self.gamma:g} every {self.lr_step} steps{warm}"

    def scheduler(self, optimizer: Any, start: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The schedule on the optimizer, positioned at `start`: its lr is a pure function of the step, so a
        resumed run rebuilds it from the checkpoint's step instead of saving it (the optimizer's state holds
        the last lr used, not the base)."""
        for group in optimizer.param_groups:
            group["initial_lr"] = self.lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor, last_epoch=start - 1)


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


def build_net(
    cfg: TrainConfig, spec: DataSpec, resume_from: Path | None = None, teacher: torch.nn.Module | None = None
) -> torch.nn.Module:
    """The article's ConvDiffusionModel, or (objective=diffusion) a UNet denoiser over the manifest's classes:
    the preset's, or when resuming the one the checkpoint records (a preset's structure may have changed since).
    objective=distill: a copy of the teacher (then the checkpoint's weights when resuming)."""
    if cfg.objective == "reconstruct":
        return ConvDiffusionModel()
    from artscale.models.denoiser import preset_denoiser
    from artscale.train.checkpoint import resume_denoiser

    if teacher is not None:
        from artscale.train.distill import student_from

        return student_from(teacher)
    if not spec.classes:
        raise UserError(f"data={cfg.data}: objective=diffusion needs a shards dir with a manifest (its classes)")
    net = preset_denoiser(
        cfg.denoiser,
        cfg.image_size,
        len(spec.classes),
        cfg.block_out_channels,
        cfg.layers_per_block,
        cfg.norm_num_groups,
    )
    return resume_denoiser(resume_from, net) if resume_from else net


def build_objective(
    cfg: TrainConfig,
    spec: DataSpec,
    acc: Any,
    loss_fn: HybridLoss,
    start: int,
    teacher: tuple[torch.nn.Module, dict[str, Any]] | None = None,
) -> Reconstruct | Diffusion:
    """The objective the loop calls; a diffusion run's draws continue at micro-batch start x grad_accum."""
    if cfg.objective == "reconstruct":
        return Reconstruct(loss_fn, acc.autocast, cfg.image_size)
    from artscale.diffusion.schedulers import train_scheduler

    if teacher is not None:
        from diffusers import DDPMScheduler

        from artscale.train.distill import Distill

        return Distill(
            DDPMScheduler.from_config(teacher[1]["scheduler"]),  # the teacher's forward process, not the config's
            teacher[0],
            num_classes=len(spec.classes),
            steps=cfg.sample_steps,
            substeps=cfg.teacher_substeps,
            teacher_sampler=cfg.teacher_sampler,
            guidance=cfg.guidance,
            cond_drop=cfg.cond_drop,
            autocast=acc.autocast,
            seed=cfg.seed,
            rank=acc.process_index,
            first_call=start * cfg.grad_accum,
            device=acc.device,
        )
    return Diffusion(
        train_scheduler(cfg.prediction_type, cfg.beta_schedule, cfg.zero_terminal_snr),
        num_classes=len(spec.classes),
        cond_drop=cfg.cond_drop,
        min_snr_gamma=cfg.min_snr_gamma,
        perceptual=loss_fn,
        autocast=acc.autocast,
        seed=cfg.seed,
        rank=acc.process_index,
        first_call=start * cfg.grad_accum,
        device=acc.device,
        sampler=cfg.sampler,
        sample_steps=cfg.sample_steps,
        guidance=cfg.guidance,
    )


def _extras(
    net: torch.nn.Module,
    objective: Reconstruct | Diffusion,
    spec: DataSpec,
    cfg: TrainConfig,
    ema: Ema | None,
    teacher_meta: dict[str, Any] | None = None,
) -> Any:
    """What checkpoints and final/ hold beside the raw weights: ema.safetensors, denoiser.json (with the
    sampling record `artscale sample` defaults to, and a student's `distilled` record)."""
    from safetensors.torch import save_file

    from artscale.train.distill import distilled_record, sampling_record

    def write(folder: Path) -> None:
        if ema is not None:
            save_file(ema.state_dict(), str(folder / EMA_NAME))
        if isinstance(objective, Diffusion):
            meta = {
                "unet": dict(net.config),
                "scheduler": {k: v for k, v in dict(objective.scheduler.config).items() if not k.startswith("_")},
                "classes": spec.classes,
                "null_label": objective.null_label,
                "prediction_type": str(objective.scheduler.config.prediction_type),
                "image_size": cfg.image_size,
                "sampling": sampling_record(cfg),
            }
            if teacher_meta is not None:
                meta["distilled"] = distilled_record(cfg, teacher_meta)
            write_json_atomic(folder / DENOISER_NAME, meta)

    return write


def train(cfg: TrainConfig) -> int:
    """Train until the plan's last step (returns 0) or a stop signal (checkpoints, returns EXIT_PREEMPTED)."""
    with StopSignals() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopSignals) -> int:
    from accelerate.utils import set_seed

    cfg = absolute_paths(cfg)
    spec = data_spec(cfg.data, cfg.image_size)
    teacher = None
    if cfg.objective == "distill":  # a bad teacher stops here, before anything is written
        from artscale.train.distill import load_teacher

        teacher = load_teacher(cfg.teacher, cfg.image_size, spec.classes)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, cfg.to_dict(), cfg.force)
    precision = precision_for(cfg)
    acc = accelerator(cfg, run_dir, precision)
    resume_from = shared_resume_point(acc, run_dir, cfg.resume)
    if acc.device.type == "cpu":
        keep_freed_memory()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
    cfg = dataclasses.replace(cfg, num_workers=loader_workers(cfg.num_workers, acc.device.type, local_processes))
    plan = Plan.make(cfg, spec, acc.num_processes)
    set_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True  # one input shape for the whole run: pick the fastest conv kernels once
    net = build_net(cfg, spec, resume_from, teacher[0] if teacher else None).to(acc.device)
    with acc.local_main_process_first():  # one process per node fills the node's VGG weights cache
        loss_fn = HybridLoss(cfg.vgg_weights, cfg.perceptual_weight).to(acc.device)
    fmt = torch.channels_last if cfg.use_channels_last() else torch.contiguous_format
    net, loss_fn = net.to(memory_format=fmt), loss_fn.to(memory_format=fmt)
    optimizer = adam(net.parameters(), plan.lr, acc.device)
    model, optimizer = acc.prepare(net, optimizer)  # DDP, then torch.compile when compile=true (setup.py)
    ema = Ema(net, cfg.ema_decay) if cfg.ema_decay > 0 else None
    ckpt = CheckpointManager(acc, run_dir, cfg.to_dict(), net, cfg.checkpoint_every, cfg.keep_checkpoints)
    state = ckpt.load(resume_from) if resume_from else {}
    start = int(state.get("step", 0))
    if ema is not None and resume_from:
        if not (resume_from / EMA_NAME).is_file():
            raise UserError(f"{resume_from} holds no {EMA_NAME} (trained with ema_decay=0): resume with ema_decay=0")
        ema.load(read_state_dict(resume_from / EMA_NAME), int(state.get("ema_step", 0)), str(resume_from / EMA_NAME))
    objective = build_objective(cfg, spec, acc, loss_fn, start, teacher)
    ckpt.extras = extras = _extras(net, objective, spec, cfg, ema, teacher[1] if teacher else None)
    if start > plan.total_steps:
        raise UserError(
            f"{resume_from} is at step {start}, past this run's last step {plan.total_steps}: raise max_steps or epochs"
        )
    if resume_from:
        acc.print(f"resumed from step {start} ({resume_from})")
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / CONFIG_NAME, cfg.to_dict())
        rewind_metrics(run_dir, start, wandb=cfg.tracker == "wandb")
    acc.print(
        f"world size {plan.world}, global batch {plan.global_batch} ({cfg.batch_size} per process x {plan.world} "
        f"processes x grad_accum {cfg.grad_accum}); steps {start} -> {plan.total_steps} ({plan.steps_per_epoch} per epoch), "
        f"{plan.describe()}; device {acc.device}"
    )
    acc.print(f"{'warning: ' if precision.warning else ''}mixed precision: {precision.mode} ({precision.reason})")
    acc.print(f"channels_last: {'on' if fmt == torch.channels_last else 'off'} ({cfg.channels_last})".lower())
    start_trackers(acc, cfg, run_dir)
    steps = StepLog(acc, cfg, plan, start, state, objective.names)
    samples = Samples(acc, spec, cfg, objective)
    evals = Evals(acc, spec, cfg, objective, plan.total_steps, steps.log, lambda: stop.requested)

    def trainer_state() -> dict[str, Any]:
        return {**steps.state(), **({"ema_step": ema.step} if ema is not None else {})}

    def averaged() -> torch.nn.Module:  # samples and validation use the EMA weights where there are some
        return ema.averaged() if ema is not None else net

    data = iter(
        train_loader(
            spec,
            batch_size=cfg.batch_size,
            epoch_batches=plan.steps_per_epoch * cfg.grad_accum,
            seed=cfg.seed,
            rank=acc.process_index,
            num_workers=cfg.num_workers,
            start=start * cfg.grad_accum,
            hflip=cfg.hflip,
        )
    )
    schedule = plan.scheduler(optimizer, start)
    model.train()
    for step in range(start, plan.total_steps):
        lr = schedule.get_last_lr()[0]
        for _ in range(cfg.grad_accum):
            images, labels = steps.next_batch(data)
            images, labels = to_device(images, acc.device, fmt), labels.to(acc.device, non_blocking=True)
            with acc.accumulate(model):
                loss, parts = objective.loss(model, images, labels)
                acc.backward(loss)
                grad_norm = (
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                    if acc.sync_gradients
                    else None
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if ema is not None and acc.sync_gradients:  # an optimizer step, not an accumulation micro-step
                ema.update()
            steps.add(loss, parts)
        schedule.step()  # once per optimizer step, not per micro-batch
        done = step + 1
        if steps.end_step(done, stop.requested, lr, grad_norm):  # save first: SLURM's warning is minutes
            path = ckpt.save(done, trainer_state())
            acc.print(
                f"stopped by a signal at step {done}: saved {path}; run the same command again to resume (exit {EXIT_PREEMPTED})"
            )
            steps.close()
            acc.end_training()
            return EXIT_PREEMPTED
        if done % cfg.val_every == 0 or done == plan.total_steps:
            if metrics := validate(averaged(), objective, spec, cfg, acc):
                steps.log(done, metrics)
        if done % cfg.sample_every == 0 or done == plan.total_steps:
            samples.write(done, averaged())
        evals.maybe(done, averaged)  # KID/FID every eval_every steps (off by default)
        ckpt.maybe_save(done, trainer_state)
    steps.close()
    if ckpt.last_saved != plan.total_steps:
        ckpt.save(plan.total_steps, trainer_state())
    if acc.is_main_process:
        save_final(net.state_dict(), run_dir, cfg.to_dict(), plan.total_steps, extras)
    acc.wait_for_everyone()
    acc.print(f"done: step {plan.total_steps}, final weights in {run_dir / 'final'} (skipped samples: {steps.skipped})")
    digest = f" (ema {ema.digest()})" if ema is not None else ""
    print(f"rank {acc.process_index}/{plan.world} finished at step {plan.total_steps}{digest}", flush=True)
    acc.end_training()
    return 0


def main(argv: list[str]) -> int:
    """`[--config FILE] [key=value ...]` -> train; returns the exit code."""
    args = train_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return train(load_config(args.config, args.overrides))

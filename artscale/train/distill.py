"""Distillation (`objective=distill`): a student that samples in a few DDIM steps what its teacher draws in many guided ones.

One phase, TRACT-style (Berthelot et al. 2023, arXiv 2303.04248; Salimans & Ho's progressive
distillation without its halving rounds): the student's timesteps are DDIM's trailing grid of
`sample_steps` (999, 749, 499, 249 for 4) and its sampler is diffusers' DDIMScheduler over that grid.
A training image is noised to one of those timesteps t; the frozen teacher (the run's EMA weights)
runs `teacher_substeps` guided DDIM steps from there to the student's next timestep s; the target is
the prediction whose one DDIM step from t lands exactly where the teacher landed. Guidance is baked
in: the student samples with one pass per step, its labels the class asked for. Labels are dropped to
the null class with probability cond_drop, so the unconditional student (img2img with no class) learns
the teacher's unconditional trajectory.

Why this and not the others (the note in docs): progressive halving needs log2(teacher / student steps)
rounds, each a training run, and consistency distillation needs many more steps to converge than a CPU
budget of twice the teacher's training allows; one phase from the teacher's own weights does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from artscale.contracts.run_dir import load_denoiser
from artscale.core.errors import UserError
from artscale.diffusion.noise import noise_for
from artscale.diffusion.schedulers import make_sampler
from artscale.train.objectives import Diffusion


def load_teacher(teacher: str, image_size: int, classes: Sequence[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher's UNet (EMA weights, eval mode, frozen) and its denoiser.json; a bad teacher is one line."""
    path = Path(teacher)
    if not path.exists():
        raise UserError(f"teacher={teacher}: not found (a diffusion run dir)")
    try:
        unet, meta = load_denoiser(path)
    except UserError as e:
        raise UserError(f"teacher={teacher}: {e}") from None
    if meta["weights"] != "ema":
        raise UserError(f"teacher={teacher} holds no EMA weights (trained with ema_decay=0): distil an EMA run")
    if meta.get("distilled"):
        raise UserError(f"teacher={teacher} is itself a distilled student: distil its teacher instead")
    if int(meta["image_size"]) != image_size:
        raise UserError(
            f"teacher={teacher} draws {meta['image_size']} px images and this run trains at {image_size} px: "
            "set image_size and data to the teacher's"
        )
    if list(meta["classes"]) != list(classes):
        raise UserError(f"teacher={teacher} was trained on other classes ({', '.join(meta['classes'])}) than data's")
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet, meta


def student_from(teacher: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of the teacher: the student starts from its weights."""
    from diffusers import UNet2DModel

    student = UNet2DModel.from_config(teacher.config)
    student.load_state_dict(teacher.state_dict())
    return student.train()


def student_grid(scheduler_config: dict[str, Any], steps: int) -> tuple[list[int], list[int]]:
    """(the student's timesteps, the timestep each steps to: -1 is the clean image), as its DDIM sampler has them."""
    ddim = make_sampler("ddim", scheduler_config)
    ddim.set_timesteps(steps, device="cpu")
    ts = [int(t) for t in ddim.timesteps]
    gap = ddim.config.num_train_timesteps // steps  # DDIMScheduler's own prev_timestep rule
    return ts, [t - gap for t in ts]


class Distill(Diffusion):
    """The student's loss: MSE between its prediction at t and the prediction whose DDIM step lands where the
    teacher's guided substeps did. Draws continue per (seed, rank, micro-batch) as Diffusion's (exact resume)."""

    names = ("mse", "perceptual")

    def __init__(
        self,
        scheduler: Any,
        teacher: torch.nn.Module,
        *,
        num_classes: int,
        steps: int,
        substeps: int,
        guidance: float,
        teacher_sampler: str = "dpm++",
        cond_drop: float = 0.1,
        autocast: Callable[[], Any] | None = None,
        seed: int = 0,
        rank: int = 0,
        first_call: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(
            scheduler,
            num_classes=num_classes,
            cond_drop=cond_drop,
            autocast=autocast,
            seed=seed,
            rank=rank,
            first_call=first_call,
            device=device,
            sampler="ddim",
            sample_steps=steps,
            guidance=1.0,  # baked in: the student's grids and evals run one pass per step
        )
        self.teacher = teacher.to(self.device).eval()
        self.teacher_guidance, self.substeps, self.teacher_sampler = guidance, substeps, teacher_sampler
        ts, prev = student_grid(scheduler.config, steps)
        self.t_grid = torch.tensor(ts, device=self.device)
        self.s_grid = torch.tensor(prev, device=self.device)
        self.val_names = ("loss", *(f"loss_t{t}" for t in ts))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at t, 1 at t < 0 (DDIM's final step, set_alpha_to_one), shaped to broadcast over images."""
        a = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t < 0, torch.ones_like(a), a).view(-1, 1, 1, 1)

    def x0_eps(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha(t)
        if self.v:
            return a.sqrt() * x_t - (1 - a).sqrt() * pred, a.sqrt() * pred + (1 - a).sqrt() * x_t
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt(), pred

    @torch.no_grad()
    def teacher_lands(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Where `substeps` guided solver steps of the teacher take x_t from t to s (per image): DDIM, or
        DPM-Solver++(2M) (diffusers' midpoint form; its first step is DDIM's, and a step to the clean image
        first order, as diffusers' lower_order_final)."""
        n, w = x_t.shape[0], self.teacher_guidance
        both = torch.cat([labels, torch.full_like(labels, self.null_label)])
        x, previous = x_t.float(), None
        for j in range(self.substeps):
            u = t - torch.div((t - s) * j, self.substeps, rounding_mode="floor")
            nxt = t - torch.div((t - s) * (j + 1), self.substeps, rounding_mode="floor")
            with self._attention(), self.autocast() if self.autocast else contextlib.nullcontext():
                out = self.teacher(torch.cat([x, x]), torch.cat([u, u]), class_labels=both).sample.float()
            x0, _ = self.x0_eps(x, out[n:] + w * (out[:n] - out[n:]), u)
            a_u, a_n = self.alpha(u), self.alpha(nxt)
            h = torch.log(a_n.sqrt() / (1 - a_n).sqrt()) - torch.log(a_u.sqrt() / (1 - a_u).sqrt())  # inf at the end
            x0_used = x0
            if previous is not None and self.teacher_sampler == "dpm++":
                half_over_r = h / (2 * previous[1])
                x0_used = torch.where(nxt.view(-1, 1, 1, 1) < 0, x0, (1 + half_over_r) * x0 - half_over_r * previous[0])
            x = ((1 - a_n) / (1 - a_u)).sqrt() * x - a_n.sqrt() * torch.expm1(-h) * x0_used
            previous = (x0, h)
        return x

    def target(self, x_t: torch.Tensor, x_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The prediction at t whose DDIM step to s gives x_s (Salimans & Ho, eq. 8): its x0, then v or epsilon."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        ratio = (1 - a_s).sqrt() / (1 - a_t).sqrt()
        x0 = (x_s - ratio * x_t) / (a_s.sqrt() - ratio * a_t.sqrt())
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        return a_t.sqrt() * eps - (1 - a_t).sqrt() * x0 if self.v else eps

    def _loss_at(
        self, model: torch.nn.Module, x0: torch.Tensor, noise: torch.Tensor, i: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Per-image loss of the student's step i from x0 noised with `noise`."""
        t, s = self.t_grid[i], self.s_grid[i]
        a = self.alpha(t)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        want = self.target(x_t, self.teacher_lands(x_t, t, s, labels), t, s)
        with self._attention():
            pred = model(x_t, t, class_labels=labels, return_dict=False)[0].float()
        return F.mse_loss(pred, want, reduction="none").mean(dim=(1, 2, 3))

    def loss(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = images.float() * 2 - 1
        i, noise, drop = self._draw(x0, len(self.t_grid))  # which of the student's steps
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        mse = self._loss_at(model, x0, noise, i, labels).mean()
        return mse, {"mse": mse, "perceptual": mse.new_zeros(())}

    def val_sums(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, keys: Sequence[str]
    ) -> dict[str, float]:
        """The loss at each of the student's timesteps, noise from (seed, key): comparable across runs."""
        x0 = images.float() * 2 - 1
        noise = noise_for(self.seed, list(keys), x0.shape[1:]).to(x0.device)
        sums = {}
        for k, t in enumerate(self.t_grid.tolist()):
            i = torch.full((x0.shape[0],), k, dtype=torch.long, device=x0.device)
            sums[f"loss_t{t}"] = self._loss_at(model, x0, noise, i, labels).sum().item()
        sums["loss"] = sum(sums.values()) / len(self.t_grid)
        return sums


def sampling_record(cfg: Any) -> dict[str, Any]:
    """What `artscale sample` and `generate --strength` take by default: the run's sampler, steps and guidance.
    A student's guidance is baked in (`guidance_baked`), so it samples with one pass per step."""
    baked = cfg.objective == "distill"
    return {"sampler": cfg.sampler, "steps": cfg.sample_steps, "guidance": cfg.guidance, "guidance_baked": baked}


def distilled_record(cfg: Any, teacher_meta: dict[str, Any]) -> dict[str, Any]:
    """denoiser.json's `distilled`: from which teacher, to how many steps, with which guidance."""
    return {
        "teacher": str(Path(cfg.teacher).resolve()),
        "teacher_step": teacher_meta.get("step"),
        "teacher_weights": teacher_meta["weights"],
        "steps": cfg.sample_steps,
        "teacher_substeps": cfg.teacher_substeps,
        "teacher_sampler": cfg.teacher_sampler,
        "guidance": cfg.guidance,
        "guidance_input": False,
    }

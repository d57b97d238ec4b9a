"""This module holds the training objectives: what a step computes from (model, images, labels).

One loop (artscale.train.loop) drives the article's reconstruction and diffusion alike.

Both have `loss(model, images, labels) -> (loss, {name: float tensor})` for training and
`val_sums(model, images, labels, keys) -> {name: sum over the batch}` for validation (summed over
ranks, then divided by the image count). Images arrive as float [0, 1] [N, 3, H, W] on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from artscale.core.seeds import stable_seed
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import sample, torch_predict
from artscale.diffusion.schedulers import make_sampler
from artscale.models.article import normalize
from artscale.train.losses import HybridLoss

# The VGG term on the predicted clean image counts only where the input is little noised: at high
# noise the best x0 estimate is a blur, and pulling its VGG features towards the real image's asks
# the model for detail the input does not hold.
PERCEPTUAL_MAX_T = 200
# Validation noises each image at these timesteps with noise drawn from (seed, key): the same
# work for every run, whatever the batch size or rank count, so val/loss compares across runs.
VAL_TIMESTEPS = (100, 300, 500, 700, 900)
GRID_COLUMNS = 8


class Reconstruct:
    """The article's objective: the model maps an image to itself; MSE + perceptual_weight x VGG16 loss."""

    names = ("mse", "perceptual")
    val_names = ("mse", "perceptual", "psnr", "ssim")

    def __init__(self, loss_fn: HybridLoss, autocast: Callable[[], Any], image_size: int) -> None:
        self.loss_fn, self.autocast, self.image_size = loss_fn, autocast, image_size

    def loss(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output = model(normalize(images))
        with self.autocast():
            loss, mse, perceptual = self.loss_fn(output, images)
        return loss, {"mse": mse, "perceptual": perceptual}

    def val_sums(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, keys: Sequence[str]
    ) -> dict[str, float]:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        with self.autocast():
            out = model(normalize(images))
            _, mse, perceptual = self.loss_fn(out, images)
        out, n = out.float().clamp(0, 1), images.shape[0]
        psnr = peak_signal_noise_ratio(out, images, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(
            out, images, data_range=1.0, reduction="none", kernel_size=min(11, self.image_size - 1)
        )
        return {
            "mse": mse.item() * n,
            "perceptual": perceptual.item() * n,
            "psnr": psnr.sum().item(),
            "ssim": ssim.sum().item(),
        }


class Diffusion:
    """Denoising with diffusers' DDPMScheduler for the forward process (`add_noise`, `get_velocity`).

    Timesteps, noise and label drops of micro-batch i on rank r come from a generator seeded with
    (seed, r, i) alone, and a resumed run starts at i = step x grad_accum: resume is exact without
    saving generator state, and ranks draw different noise."""

    names = ("mse", "perceptual")

    def __init__(
        self,
        scheduler: Any,
        *,
        num_classes: int,
        cond_drop: float = 0.1,
        min_snr_gamma: float = 0.0,
        perceptual: HybridLoss | None = None,
        autocast: Callable[[], Any] | None = None,
        seed: int = 0,
        rank: int = 0,
        first_call: int = 0,
        device: torch.device | str = "cpu",
        sampler: str = "dpm++",
        sample_steps: int = 20,
        guidance: float = 3.0,
    ) -> None:
        self.scheduler, self.null_label = scheduler, num_classes
        self.num_classes, self.cond_drop, self.min_snr_gamma = num_classes, cond_drop, min_snr_gamma
        self.perceptual = perceptual if perceptual is not None and perceptual.vgg is not None else None
        self.autocast = autocast
        self.seed, self.rank, self.calls = seed, rank, first_call
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.v = scheduler.config.prediction_type == "v_prediction"
        self.sampler, self.sample_steps, self.guidance = sampler, sample_steps, guidance
        self.val_names = ("loss", *(f"loss_t{t}" for t in VAL_TIMESTEPS))

    def targets(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noised input x_t, what the model must predict: v or the noise)."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        return x_t, (self.scheduler.get_velocity(x0, noise, t) if self.v else noise)

    def predicted_x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean image the prediction implies: x0 = sqrt(a) x_t - sqrt(1 - a) v, or (x_t - sqrt(1 - a) eps) / sqrt(a)."""
        a = self.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
        if self.v:
            return a.sqrt() * x_t - (1 - a).sqrt() * pred
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt().clamp_min(1e-8)

    def _weights(self, t: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma (https://arxiv.org/abs/2303.09556): min(snr, gamma) / snr for epsilon, / (snr + 1) for v.
        diffusers' compute_snr reads only `alphas_cumprod`: this objective's copy, on the device already
        (the scheduler's lives on the CPU: a blocking copy of it at every step would be a host sync)."""
        if not self.min_snr_gamma:
            return torch.ones(t.shape, device=t.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self, t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / (snr + 1) if self.v else clipped / snr.clamp_min(1e-12)

    def _attention(self) -> contextlib.AbstractContextManager:
        """On CPU, attention by plain matmul + softmax: torch's CPU flash-attention backward is slow on the
        tiny UNet's small middle block (bench/train_step.py, docs/benchmarks.md); GPUs keep their default."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)

    def _draw(self, x0: torch.Tensor, high: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps in [0, high), noise, label drops) of the next micro-batch; high 0: every training timestep."""
        g = self.generator.manual_seed(stable_seed(self.seed, self.rank, self.calls, bits=63))
        self.calls += 1
        n = x0.shape[0]
        t = torch.randint(0, high or len(self.alphas_cumprod), (n,), generator=g, device=self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        drop = torch.rand((n,), generator=g, device=self.device) < self.cond_drop
        return t, noise, drop

    def loss(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = images * 2 - 1
        t, noise, drop = self._draw(x0)
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        x_t, target = self.targets(x0, noise, t)
        with self._attention():
            pred = model(x_t, t, class_labels=labels, return_dict=False)[0].float()  # the loss in fp32, always
        per_image = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
        mse = (per_image * self._weights(t)).mean()
        if self.perceptual is None:
            return mse, {"mse": mse, "perceptual": mse.new_zeros(())}
        perceptual = self._perceptual(x_t, pred, t, images)
        return mse + self.perceptual.perceptual_weight * perceptual, {"mse": mse, "perceptual": perceptual}

    def _perceptual(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The VGG term of the images noised below PERCEPTUAL_MAX_T, summed, over the whole batch's count.

        The VGG sees the whole batch and a mask keeps the low-noise images' terms: picking them out
        (`x[t < 200]`) would read their count on the host, twice a step, and give the VGG a new batch
        shape each step (cudnn.benchmark tunes again for each). Masked-out images are replaced by their
        target, so their term is exactly 0 and no gradient flows through their (high-noise) x0 estimate."""
        low = t < PERCEPTUAL_MAX_T
        x0_hat = self.predicted_x0(x_t.float(), pred, t).clamp(-1, 1).add(1).div(2)
        x0_hat = torch.where(low.view(-1, 1, 1, 1), x0_hat, images.float())
        with self.autocast():
            per_image = self.perceptual.perceptual_per_image(x0_hat, images)
        return (per_image.float() * low).sum() / t.shape[0]

    def val_sums(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, keys: Sequence[str]
    ) -> dict[str, float]:
        x0 = images.float() * 2 - 1
        noise = noise_for(self.seed, list(keys), x0.shape[1:]).to(x0.device)
        sums = {}
        for step in VAL_TIMESTEPS:
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            x_t, target = self.targets(x0, noise, t)
            pred = model(x_t, t, class_labels=labels, return_dict=False)[0].float()
            sums[f"loss_t{step}"] = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)).sum().item()
        sums["loss"] = sum(sums.values()) / len(VAL_TIMESTEPS)
        return sums

    def grid(self, model: torch.nn.Module, columns: int = GRID_COLUMNS, chunk: int = 0) -> tuple[torch.Tensor, int]:
        """New images from fixed noise, one row per class: ([classes x columns, 3, H, W] in [0, 1], columns).

        `chunk` > 0 samples at most that many images at once (twice as many rows with guidance): with
        many classes one batch of them all would not fit beside training on the device. The noise is
        drawn per image (its key), so the grid is the same in any chunks."""
        size = model.config.sample_size
        count = self.num_classes * columns
        step = chunk if chunk > 0 else count
        parts = []
        for first in range(0, count, step):
            keys = list(range(first, min(first + step, count)))
            noise = noise_for(self.seed, keys, (3, size, size)).to(self.device)
            labels = torch.tensor(keys, device=self.device) // columns
            x = sample(
                torch_predict(model),
                make_sampler(self.sampler, self.scheduler.config),
                noise,
                labels,
                self.null_label,
                steps=self.sample_steps,
                guidance=self.guidance,
            )
            parts.append(x.float().clamp(-1, 1).add(1).div(2).cpu())
        return torch.cat(parts), columns

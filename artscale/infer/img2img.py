"""img2img for `artscale generate` with a denoiser: each input image noised part of the way and denoised (SDEdit)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artscale.core.errors import UserError
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import Predict, sample, to_model, to_uint8
from artscale.diffusion.schedulers import make_sampler
from artscale.infer.sample import bound_predict, first_channels, onnx_predict, resolve_sampling
from artscale.infer.session import denoiser_bytes_per_pixel


def variations(
    predict: Predict,
    sampler: Any,
    pixels: np.ndarray,
    keys: list[str],
    labels: list[int],
    null_label: int,
    *,
    seed: int,
    steps: int,
    guidance: float,
    strength: float,
    device: torch.device | None = None,
) -> np.ndarray:
    """img2img (SDEdit) of uint8 [N, H, W, 3] images: each noised to `strength` with noise from (seed, its key).
    The loop runs on `device` (the CPU by default): one copy in, one out."""
    init = to_model(pixels).to(device or "cpu")
    noise = noise_for(seed, keys, tuple(init.shape[1:])).to(init.device)
    out = sample(
        predict,
        sampler,
        noise,
        torch.tensor(labels),
        null_label,
        steps=steps,
        guidance=guidance,
        init=init,
        strength=strength,
    )
    return to_uint8(out)


class Variations:
    """generate's runner for a diffusion denoiser: a batch of images and their listing entries -> img2img.

    The noise of a file comes from (seed, its relative path), so shards and reruns agree; its class is
    `class_name`, or with `class_from_parent` its parent folder's name (generate skips the others),
    or none (the null class: the unconditional model). With `device` "cuda" (a CUDA session) the loop
    stays on the GPU through IO binding, as in `artscale sample`, on `stream` (open_denoiser's) when
    given. generate calls it from two threads at once on a GPU."""

    def __init__(
        self,
        session,
        *,
        device: str | None = None,
        stream: torch.cuda.Stream | None = None,
        class_name: str = "",
        class_from_parent: bool = False,
        strength: float = 0.6,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        seed: int = 0,
        model: str | Path = "the ONNX model",
    ) -> None:
        """steps, sampler, guidance: None takes the model's own (sample.resolve_sampling)."""
        from artscale.contracts.onnx import read_metadata

        if not 0.0 <= strength <= 1.0 or (steps is not None and steps < 1):
            raise UserError(f"--strength {strength} --steps {steps}: need 0 <= strength <= 1 and steps >= 1")
        self.meta = read_metadata(session, model)
        chosen = resolve_sampling(self.meta, sampler, steps, guidance)
        sampler, steps, guidance = chosen.sampler, chosen.steps, chosen.guidance
        self.classes, self.null_label = list(self.meta["classes"]), int(self.meta["null_label"])
        if class_name and class_name not in self.classes:
            raise UserError(f"--class {class_name}: not one of the model's classes ({', '.join(self.classes)})")
        make_sampler(sampler, self.meta["scheduler"])  # an unknown sampler fails now, not in a worker
        self.device = torch.device("cuda") if device == "cuda" and torch.cuda.is_available() else None
        self.stream = stream if self.device is not None else None
        if self.device is not None:
            self.predict = bound_predict(session, self.device, self.stream)
        else:
            self.predict = onnx_predict(session)
        rows = 2 if chosen.loop_guidance != 1.0 else 1  # cond and uncond: what generate sizes a batch by
        self.bytes_per_pixel = denoiser_bytes_per_pixel(first_channels(self.meta), rows)
        self.class_name, self.class_from_parent = class_name, class_from_parent
        self.opts = dict(seed=seed, steps=steps, guidance=chosen.loop_guidance, strength=strength)
        self.sampler = sampler
        self.settings = dict(
            class_name=class_name,
            class_from_parent=class_from_parent,
            sampler=sampler,
            **{**self.opts, "guidance": guidance},
            sampling_from=chosen.sources,
            passes_per_step=rows,
        )
        torch.set_num_threads(1)  # each inference stream runs its own loop; torch's ops are the scheduler's few

    def skip_reason(self, rel: str) -> str:
        """Why a file gets no variation (its parent folder names no class), or ""."""
        parent = Path(rel).parent.name
        if self.class_from_parent and parent not in self.classes:
            return f"parent folder {parent or '(top)'!r} is not one of the model's classes"
        return ""

    def label(self, rel: str) -> int:
        name = Path(rel).parent.name if self.class_from_parent else self.class_name
        return self.classes.index(name) if name else self.null_label

    def __call__(self, batch: np.ndarray, entries: list) -> np.ndarray:
        keys = [e.rel for e in entries]
        sampler = make_sampler(self.sampler, self.meta["scheduler"])  # stateful: one per batch in flight
        labels = [self.label(k) for k in keys]
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return variations(
                self.predict, sampler, batch, keys, labels, self.null_label, **self.opts, device=self.device
            )

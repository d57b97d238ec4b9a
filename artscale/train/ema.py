"""An exponential moving average of the weights, for both objectives: diffusers' `EMAModel`.

EMAModel averages parameters only. Buffers (the article model's BatchNorm running statistics)
are taken from the trained model as they are, as ema-pytorch does by default. Its warm-up
(decay 1 - (1 + step)^-3/4, capped at `decay`, as diffusers' train_unconditional.py sets it)
keeps the average from being frozen at the first steps' weights: 0.9 after ~20 steps, 0.99
after ~460, 0.999 after 10k.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from artscale.core.errors import UserError

EMA_NAME = "ema.safetensors"


class Ema:
    """The EMA of `net`'s parameters; `update()` after each optimizer step, on every rank alike."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.net = net
        self.names = [name for name, _ in net.named_parameters()]
        self.ema = EMAModel(
            net.parameters(), decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4, foreach=True
        )

    @property
    def step(self) -> int:
        return int(self.ema.optimization_step)

    def update(self) -> None:
        self.ema.step(self.net.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own keys (fp32 on the CPU; buffers from the model)."""
        out = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        for name, shadow in zip(self.names, self.ema.shadow_params):
            out[name] = shadow.detach().cpu().clone().contiguous()
        return out

    def load(self, state_dict: dict[str, torch.Tensor], step: int, source: str = "ema weights") -> None:
        """Back to where a checkpoint left it: the averaged weights and the warm-up's step count. Weights
        that do not fit the model (a damaged or foreign file at `source`) are one line naming it."""
        for name, shadow in zip(self.names, self.ema.shadow_params):
            got = state_dict.get(name)
            if got is None or got.shape != shadow.shape:
                what = "lacks" if got is None else f"has shape {tuple(got.shape)} for"
                raise UserError(f"{source} {what} {name} (the model's is {tuple(shadow.shape)})")
        for name, shadow in zip(self.names, self.ema.shadow_params):
            shadow.copy_(state_dict[name])
        self.ema.optimization_step = step

    def averaged(self) -> torch.nn.Module:
        """A copy of the model holding the averaged weights, in eval mode (for samples and validation)."""
        model = copy.deepcopy(self.net)
        self.ema.copy_to(model.parameters())
        return model.eval()

    def digest(self) -> str:
        """A short hash of the averaged weights: equal on every rank when the ranks agree."""
        h = hashlib.sha256()
        for shadow in self.ema.shadow_params:
            h.update(shadow.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

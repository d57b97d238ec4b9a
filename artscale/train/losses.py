"""Hybrid loss: MSE + perceptual_weight x MSE between VGG16 features[:16] (up to relu3_3).

The article compared the sigmoid output (in [0, 1]) with an ImageNet-normalised target. Here
both sides of the MSE are in [0, 1], and both are ImageNet-normalised before the VGG.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

from artscale.core.errors import UserError
from artscale.models.article import normalize
from artscale.models.state_dict import read_state_dict

log = logging.getLogger(__name__)

VGG_FILE = Path(VGG16_Weights.IMAGENET1K_V1.url).name  # vgg16-397923af.pth
RANDOM_VGG_WARNING = "vgg_weights=random: the perceptual loss uses an UNTRAINED VGG16 (fine for tests, useless for art)"


def _vgg16_features() -> nn.Sequential:
    """VGG16 `features[:16]` initialised as torchvision initialises them (the same values for the same
    seed), without building the 120 M-parameter classifier, which cost seconds at every start."""
    features = make_layers(cfgs["D"][:9])  # conv64 x2, pool, conv128 x2, pool, conv256 x3: features[:16]
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
    return features


def _load_features(features: nn.Sequential, state: dict[str, torch.Tensor], source: str) -> None:
    """A whole VGG16 state dict, or one holding only its feature extractor, into `features[:16]`."""
    if any(k.startswith("features.") for k in state):
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    wanted = features.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UserError(f"{source} is not a VGG16 state dict: missing {', '.join(missing[:4])}")
    try:
        features.load_state_dict({k: state[k] for k in wanted})
    except RuntimeError as e:
        raise UserError(f"{source} is not a VGG16 state dict: {str(e).splitlines()[-1].strip()}") from None


def load_vgg_features(weights: str = "imagenet") -> nn.Sequential:
    """VGG16 `features[:16]`, frozen, in eval mode.

    `weights`: `imagenet` (torchvision's weights API and its cache under $TORCH_HOME), a path to
    a local torchvision VGG16 weights file, or `random` (tests and demos only; logs a warning).
    """
    features = _vgg16_features()
    if weights == "imagenet":
        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # URLError offline, a hash mismatch, a half-written cache file
            cache = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
            raise UserError(
                f"cannot get VGG16 ImageNet weights ({type(e).__name__}: {e}); either copy {VGG_FILE} "
                f"to {cache} or pass vgg_weights=/path/to/{VGG_FILE} (vgg_weights=random only for tests)"
            ) from None
        _load_features(features, state, str(VGG_FILE))
    elif weights == "random":
        log.warning(RANDOM_VGG_WARNING)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"vgg_weights={weights}: no such file (use imagenet, random, or a VGG16 weights file)")
        _load_features(features, read_state_dict(path, "VGG16 weights"), str(path))
    features = features.eval()
    for p in features.parameters():
        p.requires_grad_(False)
    return features


class HybridLoss(nn.Module):
    """MSE(output, target) + weight x MSE(vgg(norm(output)), vgg(norm(target))); both in [0, 1]."""

    def __init__(self, vgg_weights: str = "imagenet", perceptual_weight: float = 1.0) -> None:
        super().__init__()
        self.perceptual_weight = perceptual_weight
        self.vgg = load_vgg_features(vgg_weights) if perceptual_weight > 0 else None

    def train(self, mode: bool = True) -> HybridLoss:
        super().train(mode)
        if self.vgg is not None:
            self.vgg.eval()  # frozen: BatchNorm-free, but keep it in eval whatever the caller does
        return self

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (total, mse, perceptual)."""
        mse = F.mse_loss(output.float(), target.float())
        if self.vgg is None:
            zero = mse.new_zeros(())
            return mse, mse, zero
        with torch.no_grad():
            target_features = self.vgg(normalize(target))
        perceptual = F.mse_loss(self.vgg(normalize(output)).float(), target_features.float())
        return mse + self.perceptual_weight * perceptual, mse, perceptual

    def perceptual_per_image(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The VGG feature MSE of each image, [N] in fp32 (their mean is `forward`'s perceptual term)."""
        with torch.no_grad():
            target_features = self.vgg(normalize(target))
        diff = self.vgg(normalize(output)).float() - target_features.float()
        return diff.square().mean(dim=(1, 2, 3))

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
from torchvision.models import VGG16_Weights, vgg16

from artscale.errors import UserError
from artscale.model import normalize
from artscale.state_dict import read_state_dict

log = logging.getLogger(__name__)

VGG_FILE = Path(VGG16_Weights.IMAGENET1K_V1.url).name  # vgg16-397923af.pth
RANDOM_VGG_WARNING = "vgg_weights=random: the perceptual loss uses an UNTRAINED VGG16 (fine for tests, useless for art)"


def load_vgg_features(weights: str = "imagenet") -> nn.Sequential:
    """VGG16 `features[:16]`, frozen, in eval mode.

    `weights`: `imagenet` (torchvision's weights API and its cache under $TORCH_HOME), a path to
    a local torchvision VGG16 weights file, or `random` (tests and demos only; logs a warning).
    """
    if weights == "imagenet":
        try:
            net = vgg16(weights=VGG16_Weights.IMAGENET1K_V1)
        except Exception as e:  # URLError offline, a hash mismatch, a half-written cache file
            cache = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
            raise UserError(
                f"cannot get VGG16 ImageNet weights ({type(e).__name__}: {e}); either copy {VGG_FILE} "
                f"to {cache} or pass vgg_weights=/path/to/{VGG_FILE} (vgg_weights=random only for tests)"
            ) from None
    elif weights == "random":
        log.warning(RANDOM_VGG_WARNING)
        net = vgg16(weights=None)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"vgg_weights={weights}: no such file (use imagenet, random, or a VGG16 weights file)")
        net = vgg16(weights=None)
        state = read_state_dict(path, "VGG16 weights")
        try:
            net.load_state_dict(state)
        except RuntimeError:
            # A file holding only the feature extractor is fine too.
            feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")} or state
            try:
                net.features.load_state_dict(feats, strict=False)
                missing = [k for k in net.features[:16].state_dict() if k not in feats]
            except RuntimeError as e:
                raise UserError(f"{path} is not a VGG16 state dict: {str(e).splitlines()[0]}") from None
            if missing:
                raise UserError(f"{path} is not a VGG16 state dict: missing {', '.join(missing[:4])}") from None
    features = net.features[:16].eval()
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

"""The article's ConvDiffusionModel, unchanged: same layers, same state-dict keys.

A `.pth` saved by the article's script loads into this class as it is (see checkpoint.py).
"""

import torch
from torch import nn

from artscale.core.errors import UserError
from artscale.core.system import multiple_of_8

# ImageNet statistics: the model's input is an image in [0, 1] normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _enc(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout), nn.MaxPool2d(2))


def _up(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)


def check_size(height: int, width: int) -> None:
    """Three 2x poolings and three 2x upsamplings give the input size back only for multiples of 8."""
    if not (multiple_of_8(height) and multiple_of_8(width)):
        raise UserError(f"image size {height}x{width} is not a positive multiple of 8 (the model pools 3 times)")


class ConvDiffusionModel(nn.Module):
    """Encoder 3->64->128->256 (conv, ReLU, BatchNorm, maxpool), decoder back with additive skips."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = _enc(3, 64)
        self.enc2 = _enc(64, 128)
        self.enc3 = _enc(128, 256)
        self.dec1 = nn.Sequential(_up(256, 128), nn.ReLU(), nn.BatchNorm2d(128))
        self.dec2 = nn.Sequential(_up(128, 64), nn.ReLU(), nn.BatchNorm2d(64))
        self.dec3 = nn.Sequential(_up(64, 3), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            check_size(x.shape[-2], x.shape[-1])
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d1 = self.dec1(e3) + e2
        d2 = self.dec2(d1) + e1
        return self.dec3(d2)


_STATS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, 3, H, W) to ImageNet-normalised ones.

    Mean and std are made once per device and dtype: a new tensor from Python values each call
    would be a blocking host-to-device copy in every training step."""
    key = (images.device, images.dtype)
    if key not in _STATS:
        _STATS[key] = tuple(
            torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            for v in (IMAGENET_MEAN, IMAGENET_STD)
        )
    mean, std = _STATS[key]
    return (images - mean) / std

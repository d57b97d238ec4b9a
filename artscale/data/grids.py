"""This module lays images out in grids for people to judge by eye.

Training's sample grids, the demo's new pieces and before/after, and the model card's grid use it.

A piece smaller than TILE pixels is enlarged by a whole factor, nearest neighbour, so each of its
pixels becomes a square block: a 32 px piece drawn at 32 px shows the classes but hides their
structure, and a smooth upscale would blur what a short run got wrong.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported by what draws a grid, not by what reads one (artscale report)
    import torch

TILE = 128  # pieces smaller than this are enlarged to at least this many pixels a side
PAD = 2  # pixels between pieces, and around the grid


def enlarge_factor(size: int) -> int:
    """The whole factor a piece of `size` pixels (its longer side) is drawn enlarged by: 1 from TILE up."""
    return max(1, math.ceil(TILE / max(1, size)))


def tile_size(size: int) -> int:
    """How many pixels a piece of `size` pixels takes in a grid: what reads a grid's rows back needs."""
    return size * enlarge_factor(size)


def grid(images: torch.Tensor, columns: int, pad_value: float = 1.0) -> torch.Tensor:
    """[N, 3, H, W] (float in [0, 1], or uint8) -> one uint8 [3, H', W'] picture: `columns` pieces a row,
    small ones enlarged by nearest neighbour, PAD pixels of `pad_value` (as a fraction of white) between."""
    import torch
    from torchvision.utils import make_grid

    if images.dtype != torch.uint8:
        images = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    scale = enlarge_factor(max(images.shape[-2:]))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return make_grid(images, nrow=columns, padding=PAD, pad_value=round(pad_value * 255))


def grid_image(images: torch.Tensor | np.ndarray, columns: int) -> Image.Image:
    """The grid as an RGB image; `images` is [N, 3, H, W] as for grid(), or uint8 [N, H, W, 3] as numpy."""
    import torch

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return Image.fromarray(grid(images, columns).permute(1, 2, 0).numpy())

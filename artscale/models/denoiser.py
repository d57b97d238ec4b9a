"""The class-conditional UNet denoiser (diffusers' UNet2DModel): its presets and how one is built."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from artscale.core.errors import UserError

# name -> (block_out_channels, layers_per_block, norm_num_groups). `tiny` learned five visibly
# different classes at 32 px in about 420 steps of batch 32 on one CPU core (1.06 M parameters).
DENOISER_PRESETS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "tiny": ((32, 64, 64), 1, 8),
    "small": ((64, 128, 128, 256), 2, 32),
    "base": ((128, 256, 256, 512), 2, 32),
}

# name -> (attention levels, channels per attention head). Self-attention sits in the down and up blocks
# of that many lowest-resolution levels, where the field's pixel-space UNets have it. At 128 px, `small`
# attends at 16x16 like DDPM (attn_resolutions=(16,), https://arxiv.org/abs/2006.11239) and diffusers'
# examples/unconditional_image_generation/train_unconditional.py (one AttnDownBlock2D/AttnUpBlock2D pair,
# at 16x16 for 256 px); `base` at 32x32 and 16x16 like ADM (attention_resolutions="32,16,8",
# https://arxiv.org/abs/2105.05233; these presets end at 16x16), with ADM's 64 channels per head. The
# middle block attends in every preset (diffusers' default). `tiny` has no attention below the middle
# block: a training step on CPU is slower with one more level (docs/benchmarks.md). Runs record the structure they
# were built with (denoiser.json's UNet config), so a run started before a change here keeps its own.
PRESET_ATTENTION: dict[str, tuple[int, int]] = {"tiny": (0, 8), "small": (1, 64), "base": (2, 64)}


def block_types(levels: int, attention_levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(down_block_types, up_block_types): attention in the `attention_levels` lowest-resolution levels."""
    plain = levels - attention_levels
    down = ("DownBlock2D",) * plain + ("AttnDownBlock2D",) * attention_levels
    return down, ("AttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain  # up blocks start at the lowest


def build_denoiser(
    image_size: int,
    num_classes: int,
    block_out_channels: Sequence[int] = DENOISER_PRESETS["tiny"][0],
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention_levels: int = 0,
    attention_head_dim: int = 8,
) -> torch.nn.Module:
    """A diffusers `UNet2DModel` with `num_classes + 1` class embeddings (the last is the null class)."""
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    if image_size % 2 ** (levels - 1):
        raise UserError(f"image_size={image_size} must be a multiple of {2 ** (levels - 1)} for {levels} UNet levels")
    if any(c % norm_num_groups for c in block_out_channels):
        raise UserError(
            f"block_out_channels={list(block_out_channels)} must be multiples of norm_num_groups={norm_num_groups}"
        )
    if not 0 <= attention_levels <= levels:
        raise UserError(f"attention on {attention_levels} levels: the UNet has {levels}")
    attending = list(block_out_channels[levels - attention_levels :]) if attention_levels else []
    if any(c % attention_head_dim for c in attending):
        raise UserError(
            f"block_out_channels={list(block_out_channels)}: the levels with attention ({attending}) must be "
            f"multiples of {attention_head_dim} channels per attention head"
        )
    down, up = block_types(levels, attention_levels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=num_classes + 1,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
    )


def preset_denoiser(
    preset: str,
    image_size: int,
    num_classes: int,
    block_out_channels: Sequence[int] = (),
    layers_per_block: int = 0,
    norm_num_groups: int = 0,
) -> torch.nn.Module:
    """The preset's UNet (its attention included), its shape overridden where given (see denoiser_shape)."""
    channels, layers, groups = denoiser_shape(preset, block_out_channels, layers_per_block, norm_num_groups)
    attention, head_dim = PRESET_ATTENTION[preset]
    return build_denoiser(image_size, num_classes, channels, layers, groups, min(attention, len(channels)), head_dim)


def denoiser_shape(
    preset: str, block_out_channels: Sequence[int] = (), layers_per_block: int = 0, norm_num_groups: int = 0
) -> tuple[tuple[int, ...], int, int]:
    """(block_out_channels, layers_per_block, norm_num_groups): the preset's, each overridden when given."""
    if preset not in DENOISER_PRESETS:
        raise UserError(f"denoiser={preset!r}: choose one of {', '.join(DENOISER_PRESETS)}")
    channels, layers, groups = DENOISER_PRESETS[preset]
    return tuple(block_out_channels) or channels, layers_per_block or layers, norm_num_groups or groups

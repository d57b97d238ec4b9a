"""Starting noise as a function of (seed, key) alone, so an image depends on neither the batch size nor how the work is split."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from artscale.core.seeds import stable_seed


def noise_seed(seed: int, key: int | str) -> int:
    """A 63-bit generator seed from (seed, key): an index for sampling, a relative path for img2img."""
    return stable_seed(int(seed), key, bits=63)


def noise_for(seed: int, keys: Sequence[int | str], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise [len(keys), *shape] on the CPU, each row a function of (seed, key) alone."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(noise_seed(seed, k))) for k in keys]
    return torch.stack(rows) if rows else torch.empty((0, *shape))

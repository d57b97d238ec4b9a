"""Helpers for the export and generate tests: a model with non-trivial BatchNorm statistics, saved
as a run dir the way training saves one (no training needed to test export)."""

from __future__ import annotations

from pathlib import Path

import torch

from artscale.models.article import ConvDiffusionModel
from artscale.train.checkpoint import save_final
from artscale.train.config import TrainConfig


def random_model(seed: int = 0) -> ConvDiffusionModel:
    """Random weights and random running statistics, so eval-mode BatchNorm is not the identity."""
    torch.manual_seed(seed)
    model = ConvDiffusionModel()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def make_run_dir(
    run_dir: Path, size: int = 16, step: int = 7, data: str = "", model: ConvDiffusionModel | None = None
) -> Path:
    cfg = TrainConfig(
        image_size=size, run_dir=str(run_dir), data=data or str(run_dir / "no-shards"), vgg_weights="random"
    )
    save_final((model or random_model()).state_dict(), run_dir, cfg.to_dict(), step)
    return run_dir

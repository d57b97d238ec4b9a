"""Training on CUDA in real `artscale train` processes: bf16 (the article's model, BatchNorm and the VGG
loss) and fp16 with loss scaling (the diffusion UNet with EMA), each checkpointed and resumed.

On a GPU two processes do not compute bit-identical steps (cuDNN's benchmark may pick other
kernels, some backward kernels add in any order), so a resumed run is compared with the
uninterrupted one within a tolerance: their final weights may differ by a small fraction of how far
the weights moved after the checkpoint. A resume that lost the optimizer state, the data position
or the lr moves them by about as much as training itself. Run with `pytest -m gpu`; skipped without
CUDA (tests/conftest.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu

STEPS, CUT = 8, 4
TOLERANCE = 0.05  # of the distance the weights moved from the checkpoint to the last step


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance over every floating-point tensor of two state dicts with the same keys."""
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point()) ** 0.5


@pytest.mark.parametrize(
    "precision, objective",
    [("bf16", ["objective=reconstruct"]), ("fp16", ["objective=diffusion", "denoiser=tiny", "ema_decay=0.9"])],
    ids=["bf16-article", "fp16-diffusion"],
)
def test_a_cuda_run_resumed_from_its_checkpoint_ends_where_the_uninterrupted_run_ends(
    shards, tmp_path, precision, objective, train_cli, tiny, metrics
):
    opts = [f"mixed_precision={precision}", f"max_steps={STEPS}", f"checkpoint_every={CUT}", *objective]
    whole = tmp_path / "whole"
    first = train_cli(tiny(whole, shards, *opts))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "device cuda" in first.stdout and f"mixed precision: {precision}" in first.stdout, first.stdout[:2000]

    # A fresh run dir holding only the uninterrupted run's config and its checkpoint at CUT.
    cut = tmp_path / "cut"
    checkpoint = f"checkpoints/step-{CUT:06d}"
    shutil.copytree(whole / checkpoint, cut / checkpoint)
    shutil.copy(whole / "config.json", cut / "config.json")
    again = train_cli(tiny(cut, shards, *opts))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {CUT} ({cut / checkpoint})" in again.stdout
    assert f"finished at step {STEPS}" in again.stdout

    at_cut = load_file(whole / checkpoint / "model.safetensors")
    names = ["model.safetensors"] + (["ema.safetensors"] if "objective=diffusion" in objective else [])
    for name in names:
        a, b = load_file(whole / "final" / name), load_file(cut / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
        moved, apart = distance(a, at_cut), distance(a, b)
        assert moved > 0 and apart <= TOLERANCE * moved, f"{name}: {apart:.3g} apart after moving {moved:.3g}"
    losses = [{m["step"]: m["loss"] for m in metrics(run) if "loss" in m} for run in (whole, cut)]
    assert sorted(losses[1]) == list(range(CUT + 1, STEPS + 1))
    for step, loss in losses[1].items():
        assert loss == pytest.approx(losses[0][step], rel=TOLERANCE), step
    if precision == "fp16":  # the loss scale is part of the state: resumed, it is where the whole run's is
        scales = [
            torch.load(run / f"checkpoints/step-{STEPS:06d}/scaler.pt", weights_only=True) for run in (whole, cut)
        ]
        assert scales[0]["scale"] == scales[1]["scale"] and scales[0]["_growth_tracker"] == scales[1]["_growth_tracker"]

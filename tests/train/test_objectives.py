"""Diffusion training end to end: a short real run on shards packed from a collection whose classes
differ visibly (the demo's drawers), judged by a nearest-centroid classifier fitted on real
held-out images; plus EMA, resume and the v-prediction arithmetic. Random VGG weights where a
VGG is built (pretrained ones cannot be downloaded in tests)."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from artscale.contracts.run_dir import load_denoiser, load_weights
from artscale.core.errors import UserError
from artscale.diffusion.schedulers import train_scheduler


@pytest.fixture(scope="session")
def diffusion(tiny):
    """Overrides of a tiny diffusion run, batch 8."""

    def overrides(run: Path, shards: Path, *extra: str) -> list[str]:
        return tiny(run, shards, "objective=diffusion", "batch_size=8", *extra)

    return overrides


@pytest.mark.slow
def test_a_short_run_draws_new_images_of_the_class_asked_for(art_shards, quality_teacher, quality, metrics):
    """The diffusion-cpu preset's recipe (the demo's), at 16 px for its 400 steps: every class drawn
    recognisably and about as varied as the real images."""
    run = quality_teacher.run
    model, meta = load_denoiser(run)
    assert meta["weights"] == "ema" and meta["step"] == quality_teacher.steps and len(meta["classes"]) == 5
    preset = quality_teacher.preset
    t = time.monotonic()
    found = quality(model, meta, preset.sampler, preset.sample_steps, preset.guidance)
    sample_s = time.monotonic() - t
    labels = found["labels"]
    noise = np.random.default_rng(0).integers(0, 256, found["samples"].shape, dtype=np.uint8)
    acc, acc_noise = (
        float(np.mean(found["accuracy"])),
        float(np.mean(quality.judge(noise, labels, art_shards)["accuracy"])),
    )
    ratio = quality.texture(found["samples"]) / quality.texture(quality.real_images(art_shards)[0])
    diversity = min(found["diversity"])
    val = [m for m in metrics(run) if "val/loss" in m][-1]["val/loss"]
    print(
        f"\n{quality_teacher.steps} steps in {quality_teacher.train_s:.0f} s, {len(labels)} samples in {sample_s:.1f} s: class "
        f"accuracy {acc:.2f} (noise {acc_noise:.2f}), texture ratio {ratio:.2f}, diversity {diversity:.2f}, "
        f"val/loss {val:.3f}\nper class ({', '.join(meta['classes'])}): accuracy "
        f"{' '.join(f'{a:.2f}' for a in found['accuracy'])}, diversity {' '.join(f'{d:.2f}' for d in found['diversity'])}"
    )
    assert acc >= 0.9
    assert acc_noise <= 0.4  # chance is 0.2
    assert 0.5 <= ratio <= 2.0
    assert diversity >= 0.8  # every class at least 0.8x as varied as its real images: not a few images per class


def test_v_target_and_x0_recovery_match_diffusers_get_velocity():
    from artscale.train.objectives import Diffusion

    sched = train_scheduler()
    objective = Diffusion(sched, num_classes=3)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t, v = objective.targets(x0, noise, t)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t))
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(objective.predicted_x0(x_t, v, t), x0, atol=1e-5, rtol=1e-5)
    eps = Diffusion(train_scheduler("epsilon"), num_classes=3)
    _, target = eps.targets(x0, noise, t)
    torch.testing.assert_close(target, noise)
    torch.testing.assert_close(
        eps.predicted_x0(x_t, noise, t)[:-1], x0[:-1], atol=1e-4, rtol=1e-4
    )  # t=999: x0 is lost in noise


def test_min_snr_weights_are_min_snr_gamma_over_snr_plus_one_for_v():
    from artscale.train.objectives import Diffusion

    sched = train_scheduler()
    objective = Diffusion(sched, num_classes=3, min_snr_gamma=5.0)
    t = torch.tensor([10, 500, 990])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    torch.testing.assert_close(objective._weights(t), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_ema_equals_a_hand_computed_ema_after_k_steps():
    from artscale.train.ema import Ema

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = Ema(net, decay=0.999)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    hand = {k: v.detach().clone() for k, v in net.named_parameters()}
    for k in range(1, 31):
        (net(torch.randn(8, 4)) - torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        step = k - 1  # diffusers counts from the second update; the first copies the weights
        decay = 0.0 if step == 0 else min(0.999, 1 - (1 + step) ** -0.75)
        for name, p in net.named_parameters():
            hand[name] = decay * hand[name] + (1 - decay) * p.detach()
    averaged = ema.state_dict()
    for name in hand:
        torch.testing.assert_close(averaged[name], hand[name], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(averaged["0.weight"], net[0].weight)  # an average, not a copy
    assert torch.equal(averaged["1.running_mean"], net[1].running_mean)  # buffers: the model's own
    assert ema.step == 30
    again = Ema(net, decay=0.999)
    again.load(averaged, ema.step)
    assert again.digest() == ema.digest() and again.step == 30


@pytest.mark.slow
def test_ema_is_identical_on_two_ranks_and_checkpoints_hold_the_contract(
    art_shards, tmp_path, launch, diffusion, free_port
):
    run = tmp_path / "run"
    proc = launch(2, diffusion(run, art_shards, "max_steps=4", "checkpoint_every=2"), port=free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(
        r"rank (\d)/2 finished at step 4 \(ema ([0-9a-f]+)\)", proc.stdout
    )  # ranks' lines may interleave
    assert sorted(rank for rank, _ in found) == ["0", "1"] and len({digest for _, digest in found}) == 1
    for folder in (run / "final", run / "checkpoints" / "step-000004"):
        assert {"model.safetensors", "ema.safetensors", "denoiser.json"} <= {p.name for p in folder.iterdir()}
    raw, ema = load_file(run / "final" / "model.safetensors"), load_file(run / "final" / "ema.safetensors")
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    model, meta = load_denoiser(run, weights="raw")
    assert meta["null_label"] == 5 and meta["step"] == 4 and meta["prediction_type"] == "v_prediction"
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="diffusion run"):
        load_weights(run)


@pytest.mark.slow
def test_a_resumed_diffusion_run_ends_bit_identical_raw_and_ema(art_shards, tmp_path, train_cli, diffusion):
    """Noise, timesteps and label drops continue where the checkpoint left them (and the EMA with its warm-up)."""
    opts = ["max_steps=6", "grad_accum=2", "ema_decay=0.99", "cond_drop=0.5"]
    whole = train_cli(diffusion(tmp_path / "whole", art_shards, *opts))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    first = train_cli(diffusion(cut, art_shards, *opts, "max_steps=3", "checkpoint_every=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    again = train_cli(diffusion(cut, art_shards, *opts))
    assert again.returncode == 0 and "resumed from step 3" in again.stdout, again.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "whole" / "final" / name), load_file(cut / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def selected_perceptual(
    objective, model, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, perceptual) as Diffusion.loss computed them before the mask: the low-noise images picked out."""
    import torch.nn.functional as F

    from artscale.train.objectives import PERCEPTUAL_MAX_T

    x0 = images * 2 - 1
    t, noise, drop = objective._draw(x0)
    labels = torch.where(drop, torch.full_like(labels, objective.null_label), labels)
    x_t, target = objective.targets(x0, noise, t)
    pred = model(x_t, t, class_labels=labels, return_dict=False)[0].float()
    mse = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
    low = t < PERCEPTUAL_MAX_T
    perceptual = mse.new_zeros(())
    if bool(low.any()):
        x0_hat = objective.predicted_x0(x_t[low].float(), pred[low], t[low]).clamp(-1, 1).add(1).div(2)
        _, _, perceptual = objective.perceptual(x0_hat, images[low])
        perceptual = perceptual.float() * low.float().mean()
    return mse + objective.perceptual.perceptual_weight * perceptual, perceptual


@contextlib.contextmanager
def host_syncs(counts: dict[str, int], source: str) -> Iterator[None]:
    """Count .item(), .tolist() and bool() of tensors called from the file named `source`."""
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist")}

    def counting(name: str):
        def wrapper(self, *args):
            if sys._getframe(1).f_code.co_filename.endswith(source):
                counts[name] = counts.get(name, 0) + 1
            return originals[name](self, *args)

        return wrapper

    try:
        for name in originals:
            setattr(torch.Tensor, name, counting(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.slow
def test_the_perceptual_mask_gives_the_loss_and_gradients_of_picking_the_low_noise_images():
    """One VGG batch shape per step, no host sync in the loss, and the same loss and gradients as the per-step
    selection it replaced, on fixed batches with the same draws: 4 of 16 images below t=200, then none of 2."""
    from artscale.core.seeds import stable_seed
    from artscale.models.denoiser import build_denoiser
    from artscale.train.losses import HybridLoss
    from artscale.train.objectives import PERCEPTUAL_MAX_T, Diffusion

    torch.manual_seed(0)
    model = build_denoiser(16, 3, (32, 64, 64), 1, 8)
    loss_fn = HybridLoss("random", perceptual_weight=0.5)
    shapes = []
    loss_fn.vgg.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))

    def grads() -> list[torch.Tensor]:
        found = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return found

    for seed, n, lows in ((3, 16, 4), (0, 2, 0)):
        drawn = torch.randint(
            0, 1000, (n,), generator=torch.Generator().manual_seed(stable_seed(seed, 0, 0, bits=63))
        )  # as _draw
        assert int((drawn < PERCEPTUAL_MAX_T).sum()) == lows
        images, labels = torch.rand(n, 3, 16, 16), torch.arange(n) % 3

        def objective(seed=seed) -> Diffusion:
            return Diffusion(
                train_scheduler(), num_classes=3, perceptual=loss_fn, autocast=contextlib.nullcontext, seed=seed
            )

        old_syncs: dict[str, int] = {}
        with host_syncs(old_syncs, Path(__file__).name):
            old_loss, old_perceptual = selected_perceptual(objective(), model, images, labels)
        old_loss.backward()
        old_grads = grads()
        syncs: dict[str, int] = {}
        shapes.clear()
        with host_syncs(syncs, "objectives.py"):
            loss, parts = objective().loss(model, images, labels)
        loss.backward()
        assert old_syncs == {"__bool__": 1} and syncs == {}
        assert shapes == [(n, 3, 16, 16)] * 2  # the target's features and the estimate's, the whole batch
        assert (float(parts["perceptual"]) > 0) == (lows > 0)
        torch.testing.assert_close(parts["perceptual"], old_perceptual, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss, old_loss, rtol=1e-5, atol=1e-7)
        for new, old in zip(grads(), old_grads, strict=True):
            torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-6)


def test_a_grid_sampled_in_chunks_equals_one_sampled_at_once():
    """9 images (3 classes x 3 columns) in chunks of 4, 4 and 1 against one batch: the same noise per image."""
    from artscale.models.denoiser import build_denoiser
    from artscale.train.objectives import Diffusion

    torch.manual_seed(0)
    model = build_denoiser(16, 3, (32, 64, 64), 1, 8).eval()
    objective = Diffusion(train_scheduler(), num_classes=3, sample_steps=3, guidance=2.0, seed=5)
    whole, columns = objective.grid(model, columns=3)
    chunked, _ = objective.grid(model, columns=3, chunk=4)
    assert whole.shape == (9, 3, 16, 16) and columns == 3
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    assert (whole[0] - whole[3]).abs().max() > 0.01  # rows differ: the labels (and noise) reach the model

"""The sampler loop shared by torch and onnxruntime: noise per key, guidance, SDEdit, batch independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from artscale.core.errors import UserError
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import sample, to_model, to_uint8, torch_predict
from artscale.diffusion.schedulers import make_sampler, train_scheduler
from artscale.models.denoiser import build_denoiser


def test_noise_of_a_key_is_the_same_in_any_batch_and_differs_between_keys():
    a = noise_for(7, [0, 1, 2, 3, 4], (3, 8, 8))
    b = noise_for(7, [3, 1], (3, 8, 8))
    assert torch.equal(a[3], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(noise_for(8, [0], (3, 8, 8))[0], a[0])
    paths = noise_for(0, ["painting/a.jpg", "painting/b.jpg"], (3, 8, 8))
    assert not torch.equal(paths[0], paths[1]) and torch.equal(noise_for(0, ["painting/b.jpg"], (3, 8, 8))[0], paths[1])


def _oracle(scheduler, target: torch.Tensor):
    """The ideal denoiser when every training image is `target`: it knows x0, so it returns the exact
    epsilon or v for any noisy input. Sampling with it must end at `target`."""
    alphas = scheduler.alphas_cumprod

    def predict(x, t, labels):
        a = alphas[t].view(-1, 1, 1, 1).to(x.dtype)
        x0 = target.expand_as(x)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if scheduler.config.prediction_type == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return predict


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_the_loop_with_an_ideal_denoiser_ends_at_the_data(name, prediction_type):
    train = train_scheduler(prediction_type=prediction_type)
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)
    out = sample(
        _oracle(train, target),
        make_sampler(name, train.config),
        noise_for(0, range(4), (3, 8, 8)),
        torch.zeros(4),
        null_label=5,
        steps=10,
        guidance=3.0,
    )
    assert (out - target).abs().max() < 2e-3


def test_samplers_inherit_the_training_schedule_and_unknown_names_are_refused():
    train = train_scheduler(prediction_type="epsilon", beta_schedule="linear", zero_terminal_snr=True)
    for name in ("ddim", "dpm++"):
        s = make_sampler(name, train.config)
        assert s.config.prediction_type == "epsilon" and s.config.beta_schedule == "linear"
        assert s.config.rescale_betas_zero_snr
    with pytest.raises(UserError, match="ddim, dpm\\+\\+"):
        make_sampler("euler-ancestral", train.config)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_denoiser(16, num_classes=5).eval()


def _draw(unet, indices, batch_size, **kw):
    train = train_scheduler()
    out = []
    for i in range(0, len(indices), batch_size):
        keys = indices[i : i + batch_size]
        out.append(
            sample(
                torch_predict(unet),
                make_sampler("dpm++", train.config),
                noise_for(3, keys, (3, 16, 16)),
                torch.tensor([k % 5 for k in keys]),
                null_label=5,
                steps=4,
                **kw,
            )
        )
    return to_uint8(torch.cat(out)).astype(int)


def test_an_image_does_not_change_with_the_batch_size(unet):
    indices = list(range(8))
    ones, threes, eights = (_draw(unet, indices, b) for b in (1, 3, 8))
    assert np.abs(ones - threes).max() <= 1 and np.abs(ones - eights).max() <= 1
    assert np.abs(ones[0] - ones[5]).max() > 10  # different images, not one


def test_guidance_one_is_the_conditional_model_and_the_uncond_half_matters(unet):
    train = train_scheduler()
    noise, labels = noise_for(1, [0, 1], (3, 16, 16)), torch.tensor([0, 3])
    calls = []

    def predict(x, t, y):
        calls.append((x.shape[0], y.tolist()))
        return torch_predict(unet)(x, t, y)

    sample(predict, make_sampler("ddim", train.config), noise, labels, null_label=5, steps=2, guidance=1.0)
    sample(predict, make_sampler("ddim", train.config), noise, labels, null_label=5, steps=2, guidance=3.0)
    assert calls == [(2, [0, 3])] * 2 + [(4, [0, 3, 5, 5])] * 2


def test_sdedit_strength_zero_returns_the_input_and_one_ignores_it(unet):
    train = train_scheduler()
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    init, noise, labels = to_model(images), noise_for(0, ["a.png", "b.png"], (3, 16, 16)), torch.tensor([1, 2])
    sampler = make_sampler("ddim", train.config)
    assert np.array_equal(
        to_uint8(sample(torch_predict(unet), sampler, noise, labels, 5, steps=4, init=init, strength=0.0)), images
    )
    from_noise = sample(torch_predict(unet), sampler, noise, labels, 5, steps=4)
    ignored = sample(torch_predict(unet), sampler, noise, labels, 5, steps=4, init=init, strength=1.0)
    assert torch.equal(from_noise, ignored)
    half = to_uint8(sample(torch_predict(unet), sampler, noise, labels, 5, steps=4, init=init, strength=0.5)).astype(
        int
    )
    assert 0 < np.abs(half - images).mean() < np.abs(to_uint8(from_noise).astype(int) - images).mean()
    with pytest.raises(UserError, match="strength"):
        sample(torch_predict(unet), sampler, noise, labels, 5, steps=4, init=init, strength=1.5)

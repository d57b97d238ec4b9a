import pytest
import torch
from torchvision.models import vgg16

from artscale.core.errors import UserError
from artscale.models.article import ConvDiffusionModel
from artscale.train.losses import HybridLoss, load_vgg_features


def test_imagenet_weights_offline_give_the_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(UserError) as err:
        load_vgg_features("imagenet")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and "vgg_weights=" in msg and "\n" not in msg
    assert str(tmp_path / "empty-torch-home") in msg  # says where to put the file


def test_imagenet_weights_from_the_torch_cache(tmp_path, monkeypatch):
    torch.manual_seed(1)
    net = vgg16(weights=None)
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(net.state_dict(), cache / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    # torchvision checks the hash prefix of the file name only when check_hash is set: it is not.
    features = load_vgg_features("imagenet")
    assert torch.equal(features[0].weight, net.features[0].weight)


def test_local_file_loads(tmp_path):
    torch.manual_seed(2)
    net = vgg16(weights=None)
    torch.save(net.state_dict(), tmp_path / "vgg.pth")
    features = load_vgg_features(str(tmp_path / "vgg.pth"))
    assert len(features) == 16 and not features.training
    assert torch.equal(features[14].weight, net.features[14].weight)
    assert all(not p.requires_grad for p in features.parameters())


def test_bad_local_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_vgg_features(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read VGG16 weights"):
        load_vgg_features(str(tmp_path / "junk.pth"))
    torch.save(ConvDiffusionModel().state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not a VGG16 state dict"):
        load_vgg_features(str(tmp_path / "wrong.pth"))


def test_random_only_when_asked_and_it_warns(caplog):
    with caplog.at_level("WARNING"):
        load_vgg_features("random")
    assert "UNTRAINED VGG16" in caplog.text


def test_loss_compares_outputs_in_pixel_space():
    loss = HybridLoss("random", perceptual_weight=1.0)
    x = torch.rand(2, 3, 16, 16)
    total, mse, perceptual = loss(x, x)
    assert total.item() == pytest.approx(0.0, abs=1e-7) and mse.item() == 0.0
    total, mse, perceptual = loss(torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16))
    assert mse.item() == pytest.approx(1.0) and perceptual.item() > 0
    assert total.item() == pytest.approx(mse.item() + perceptual.item(), rel=1e-5)


def test_loss_falls_over_20_steps_on_a_tiny_batch():
    torch.manual_seed(0)
    model = ConvDiffusionModel()
    loss_fn = HybridLoss("random", perceptual_weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = torch.rand(4, 3, 16, 16)
    from artscale.models.article import normalize

    losses = []
    for _ in range(20):
        total, _, _ = loss_fn(model(normalize(target)), target)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_random_features_are_seeded_and_initialised_as_torchvision_does():
    torch.manual_seed(3)
    a = load_vgg_features("random")
    torch.manual_seed(3)
    b = load_vgg_features("random")
    assert [type(m).__name__ for m in a] == [type(m).__name__ for m in vgg16(weights=None).features[:16]]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    conv = a[14]  # kaiming normal, fan_out, as torchvision's VGG: std sqrt(2 / (256 * 3 * 3))
    assert abs(conv.weight.std().item() / (2 / (256 * 9)) ** 0.5 - 1) < 0.05 and not conv.bias.any()


def test_a_features_only_file_loads(tmp_path):
    torch.manual_seed(4)
    net = vgg16(weights=None)
    torch.save(net.features.state_dict(), tmp_path / "features.pth")
    features = load_vgg_features(str(tmp_path / "features.pth"))
    assert torch.equal(features[7].weight, net.features[7].weight)

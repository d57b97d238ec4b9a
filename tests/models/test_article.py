import pytest
import torch
from torch import nn

from artscale.contracts.run_dir import load_model, load_weights
from artscale.core.errors import UserError
from artscale.models.article import ConvDiffusionModel


class ArticleModel(nn.Module):
    """The article's definition, written out as it publishes it: the reference for keys and outputs."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, padding=1), nn.ReLU(), nn.BatchNorm2d(64), nn.MaxPool2d(2)
        )
        self.enc2 = nn.Sequential(
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.BatchNorm2d(128), nn.MaxPool2d(2)
        )
        self.enc3 = nn.Sequential(
            nn.Conv2d(128, 256, kernel_size=3, padding=1), nn.ReLU(), nn.BatchNorm2d(256), nn.MaxPool2d(2)
        )
        self.dec1 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(128),
        )
        self.dec2 = nn.Sequential(
            nn.ConvTranspose2d(128, 64, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(64),
        )
        self.dec3 = nn.Sequential(
            nn.ConvTranspose2d(64, 3, kernel_size=3, stride=2, padding=1, output_padding=1), nn.Sigmoid()
        )

    def forward(self, x):
        enc1 = self.enc1(x)
        enc2 = self.enc2(enc1)
        enc3 = self.enc3(enc2)
        dec1 = self.dec1(enc3)
        dec2 = self.dec2(dec1 + enc2)
        dec3 = self.dec3(dec2 + enc1)
        return dec3


def test_state_dict_keys_and_shapes_match_the_article():
    ours, article = ConvDiffusionModel().state_dict(), ArticleModel().state_dict()
    assert list(ours) == list(article)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in article.items()}
    assert "enc1.0.weight" in ours and "dec3.0.bias" in ours and len(ours) == 37


@pytest.mark.parametrize("h,w", [(16, 16), (128, 128), (24, 40)])
def test_output_shape_and_range(h, w):
    out = ConvDiffusionModel().eval()(torch.randn(2, 3, h, w))
    assert out.shape == (2, 3, h, w)
    assert out.min() >= 0 and out.max() <= 1


def test_size_not_multiple_of_8_is_a_clear_error():
    with pytest.raises(UserError, match="multiple of 8"):
        ConvDiffusionModel()(torch.randn(1, 3, 20, 16))


def test_article_pth_loads_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    article = ArticleModel()
    article.train()
    article(torch.randn(4, 3, 32, 32))  # move BatchNorm running stats away from their init
    article.eval()
    path = tmp_path / "model_epoch_10.pth"
    torch.save(article.state_dict(), path)
    ours, weights = load_model(path)
    assert weights.step is None and weights.config is None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), article(x))


def test_wrong_architecture_and_corrupt_files_are_refused(tmp_path):
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a ConvDiffusionModel"):
        load_weights(tmp_path / "other.pth")
    good = tmp_path / "good.pth"
    torch.save(ConvDiffusionModel().state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_weights(tmp_path / "cut.pth")
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "missing.pth")

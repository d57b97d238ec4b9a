import pytest

from artscale.config import TrainConfig, config_from_dict, load_config
from artscale.errors import UserError


def test_defaults_are_the_articles():
    cfg = load_config()
    assert (cfg.image_size, cfg.batch_size, cfg.lr, cfg.lr_step_epochs, cfg.lr_gamma, cfg.epochs) == (
        128,
        32,
        1e-3,
        30,
        0.1,
        150,
    )
    assert cfg.vgg_weights == "imagenet" and cfg.perceptual_weight == 1.0


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 8\nlr: 0.01\nmixed_precision: bf16\ntags: [a, b]\nchannels_last: false\n")
    cfg = load_config(f, ["lr=2e-4", "max_steps=7", "compile=true", "tags=x,y", "run-dir=runs/x"])
    assert cfg.batch_size == 8 and cfg.lr == 2e-4 and cfg.max_steps == 7
    assert cfg.mixed_precision == "bf16" and cfg.compile is True and cfg.channels_last is False
    assert cfg.tags == ["x", "y"] and cfg.run_dir == "runs/x"


@pytest.mark.parametrize(
    "override,message",
    [
        ("batchsize=3", "unknown config key batchsize; valid keys: data, run_dir"),
        ("compile=maybe", "expected true or false"),
        ("mixed_precision=fp8", "choose one of no, bf16, fp16"),
        ("image_size=20", "multiple of 8"),
        ("batch_size=two", "expected int"),
        ("num_workers=-2", r"must be >= 0, or -1"),
        ("lr", "expected key=value"),
    ],
)
def test_bad_values_are_rejected_with_the_reason(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    with pytest.raises(UserError, match="unknown config key epochz"):
        load_config(tmp_path / "typo.yaml")


def test_saved_config_round_trips():
    cfg = load_config(None, ["lr=0.5", "tags=a"])
    assert config_from_dict({**cfg.to_dict(), "gone_key": 1}) == cfg
    assert isinstance(TrainConfig().tags, list)


def test_the_shipped_config_is_the_articles_setup():
    from conftest import ROOT

    cfg = load_config(ROOT / "configs" / "article.yaml")
    assert (cfg.image_size, cfg.batch_size, cfg.lr, cfg.lr_step_epochs, cfg.epochs, cfg.vgg_weights) == (
        128,
        32,
        1e-3,
        30,
        150,
        "imagenet",
    )

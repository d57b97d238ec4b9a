import json

import pytest

from artscale.core.errors import UserError
from artscale.train.config import TrainConfig, load_config


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
    assert cfg.lr_schedule == "step" and cfg.warmup_steps == 0  # the article's StepLR, no warm-up


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
        ("lr_schedule=linear", r"^config lr_schedule='linear': choose one of step, cosine$"),
        ("warmup_steps=-1", r"^config warmup_steps=-1: must be >= 0"),
    ],
)
def test_bad_values_are_rejected_with_the_reason(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="nope.yaml is neither a file nor a preset"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    with pytest.raises(UserError, match="unknown config key epochz"):
        load_config(tmp_path / "typo.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["lr=0.5", "tags=a"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))  # a run's config.json is a config file
    assert load_config(tmp_path / "config.json") == cfg
    assert isinstance(TrainConfig().tags, list)


def test_the_shipped_config_is_the_articles_setup():
    cfg = load_config("article")
    assert (cfg.image_size, cfg.batch_size, cfg.lr, cfg.lr_step_epochs, cfg.epochs, cfg.vgg_weights) == (
        128,
        32,
        1e-3,
        30,
        150,
        "imagenet",
    )


def test_diffusion_keys_resolve_per_objective_and_the_article_default_is_unchanged():
    article = load_config(None, [])
    assert article.objective == "reconstruct" and article.perceptual_weight == 1.0 and article.ema_decay == 0.0
    d = load_config(None, ["objective=diffusion", "block_out_channels=16,32", "min_snr_gamma=5"])
    assert d.perceptual_weight == 0.0 and d.ema_decay == 0.9999 and d.prediction_type == "v_prediction"
    assert d.block_out_channels == [16, 32] and d.beta_schedule == "squaredcos_cap_v2" and d.cond_drop == 0.1
    assert load_config(None, ["objective=diffusion", "ema_decay=0", "perceptual_weight=0.5"]).ema_decay == 0.0
    assert load_config(None, ["ema_decay=0.99"]).ema_decay == 0.99  # EMA for the article's objective too


@pytest.mark.parametrize(
    "bad,message",
    [
        ("ema_decay=1", "ema_decay"),
        ("cond_drop=1.5", "cond_drop"),
        ("min_snr_gamma=-1", "min_snr_gamma"),
        ("block_out_channels=32,x", "list of integers"),
        ("denoiser=huge", "choose one of tiny, small, base"),
        ("prediction_type=sample", "choose one of"),
        ("sample_steps=0", "sample_steps"),
    ],
)
def test_bad_diffusion_keys_are_one_line(bad, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["objective=diffusion", bad])


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(UserError, match="zero_terminal_snr"):
        load_config(None, ["zero_terminal_snr=true", "prediction_type=epsilon"])


@pytest.mark.parametrize("name", ["diffusion", "diffusion-cpu"])
def test_the_shipped_diffusion_configs_load(name):
    cfg = load_config(name)
    assert cfg.objective == "diffusion" and cfg.ema_decay > 0
    assert cfg.lr_gamma == 1.0 or cfg.lr_schedule == "cosine"  # no StepLR drop: the article's is for its autoencoder


def test_channels_last_auto_is_on_for_the_articles_model_only_and_old_saved_values_load(tmp_path):
    """auto (the default) resolves by objective; true/false as given, from a file, the command line, or
    a config.json written before auto existed (a JSON boolean)."""
    assert load_config().channels_last == "auto" and load_config().use_channels_last() is True
    assert load_config(None, ["objective=diffusion"]).use_channels_last() is False
    assert load_config(None, ["objective=diffusion", "channels_last=on"]).use_channels_last() is True
    assert load_config(None, ["channels_last=false"]).use_channels_last() is False
    (tmp_path / "c.yaml").write_text("objective: diffusion\nchannels_last: true\n")
    assert load_config(tmp_path / "c.yaml").channels_last is True
    for saved in (True, False):
        old = {**load_config(None, ["objective=diffusion"]).to_dict(), "channels_last": saved}
        (tmp_path / "config.json").write_text(json.dumps(old))
        cfg = load_config(tmp_path / "config.json")
        assert cfg.channels_last is saved and cfg.use_channels_last() is saved
    with pytest.raises(UserError, match="channels_last='maybe': choose one of auto, true, false"):
        load_config(None, ["channels_last=maybe"])

"""Training configuration: the article's values as defaults, a YAML file, then key=value overrides.

`load_config` is a pure function shared by `artscale train`, `python -m artscale.train`, `launch/train.py`,
the sbatch scripts and `artscale submit`; `--config` takes a YAML file or a packaged preset's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from artscale.contracts.run_files import read_json
from artscale.core.checks import BadFile, printable
from artscale.core.checks import field as checked
from artscale.core.errors import UserError
from artscale.core.system import multiple_of_8
from artscale.train.presets import resolve_config

# Upper bounds that no sane run reaches but that keep a typo or a hostile file (`batch_size: 1e30`,
# `epochs: .inf`) from reaching the loop: counts, steps, sizes and loss weights.
MAX_IMAGE_SIZE = 16384
MAX_COUNT = 1 << 16
MAX_STEPS = 10**9
MAX_CHANNELS = 4096
MAX_WEIGHT = 1e6


def bounded(default: float, low: float, high: float, *, low_open: bool = False) -> Any:
    """A numeric field's default with its range beside it: every value, from a file, the command line
    or a checkpoint's saved config, must be finite and in [low, high] (above `low` with `low_open`)."""
    return field(default=default, metadata={"range": (low, high, low_open)})


@dataclass
class TrainConfig:
    """Every training key. A field's documentation is its trailing comment and the `#:` lines above it;
    other comment lines head a group of keys. docs/reference/config.md is generated from them."""

    # data and places
    data: str = "shards/demo"  # a shards dir (with manifest.json) or a webdataset URL pattern
    run_dir: str = "runs/default"  # checkpoints/, samples/, the tracker's files and final/ go here
    image_size: int = bounded(128, 8, MAX_IMAGE_SIZE)  # training resolution; must match the shards (multiple of 8)
    # optimisation (the article: Adam 1e-3, StepLR(30 epochs, 0.1), 150 epochs, batch 32)
    #: per process: the global batch is batch_size x processes x grad_accum
    batch_size: int = bounded(32, 1, MAX_COUNT)
    lr: float = bounded(1e-3, 0, 10, low_open=True)  # Adam's learning rate (the peak of the schedule), > 0
    scale_lr: bool = False  # multiply lr by processes x grad_accum (never done silently)
    #: StepLR period, in epochs, applied per optimizer step
    lr_step_epochs: float = bounded(30, 0, MAX_STEPS, low_open=True)
    lr_gamma: float = bounded(0.1, 0, 1, low_open=True)  # StepLR's factor at each period, in (0, 1]; 1.0: a constant lr
    #: step: the article's StepLR above; cosine: from lr down to 0 at the last step (lr_step_epochs and
    #: lr_gamma unused), which a short run (the diffusion-cpu preset) ends better with
    lr_schedule: Literal["step", "cosine"] = "step"
    warmup_steps: int = bounded(0, 0, MAX_STEPS)  # lr rises linearly over the first steps, then the schedule; 0: none
    epochs: float = bounded(150, 0, MAX_STEPS)  # an epoch is the manifest's train count / global batch
    max_steps: int = bounded(0, 0, MAX_STEPS)  # the run's length in optimizer steps; > 0 overrides epochs
    grad_accum: int = bounded(1, 1, MAX_COUNT)  # micro-batches per optimizer step
    #: clip the gradient norm to this; 0 disables clipping (the norm is still logged)
    max_grad_norm: float = bounded(0.0, 0, MAX_WEIGHT)
    #: reconstruct: the article's image-to-image model; diffusion: a class-conditional denoiser
    #: (diffusers' UNet2DModel) that draws new images from noise (docs/diffusion.md); distill: a few-step
    #: student of a diffusion run (`teacher`), its guidance baked in
    objective: Literal["reconstruct", "diffusion", "distill"] = "reconstruct"
    # loss
    #: VGG16 term; -1: the objective's default (1.0 reconstruct, 0 diffusion, where it applies to the
    #: predicted clean image at low-noise timesteps only)
    perceptual_weight: float = bounded(-1.0, 0, MAX_WEIGHT)
    vgg_weights: str = "imagenet"  # imagenet | a local torchvision VGG16 .pth/.safetensors | random
    # diffusion: the denoiser (a preset, or its parts; explicit values override the preset's)
    denoiser: Literal["tiny", "small", "base"] = "tiny"  # 1.1 M / 18 M / 74 M parameters
    block_out_channels: list[int] = field(default_factory=list)  # channels per UNet level; []: the preset's
    layers_per_block: int = bounded(0, 0, 64)  # 0: the preset's
    norm_num_groups: int = bounded(0, 0, MAX_CHANNELS)  # GroupNorm groups; 0: the preset's
    # diffusion: the forward process and the loss
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"  # what the network predicts
    beta_schedule: Literal["squaredcos_cap_v2", "linear"] = "squaredcos_cap_v2"  # cosine by default
    zero_terminal_snr: bool = False  # rescale betas so the last timestep is pure noise (needs v_prediction)
    min_snr_gamma: float = bounded(0.0, 0, MAX_WEIGHT)  # min-SNR loss weighting (5 is usual); 0: off
    #: probability a label is dropped to the null class (classifier-free guidance), in [0, 1]
    cond_drop: float = bounded(0.1, 0, 1)
    # an average of the weights, EMA (both objectives)
    #: the decay of an exponential moving average of the weights, updated on optimizer steps, with a
    #: warm-up so early steps are not frozen; used for samples, validation and export. -1: the
    #: objective's default (0.9999 diffusion, 0 reconstruct, which keeps the article's run unchanged); 0: off
    ema_decay: float = bounded(-1.0, 0, 1)
    # diffusion: the sample grids logged every sample_every steps (one row per class, fixed seeds)
    sampler: Literal["ddim", "dpm++"] = "dpm++"  # DPM-Solver++(2M) or DDIM
    sample_steps: int = bounded(20, 1, 10_000)  # sampler steps for the grids and eval_every
    guidance: float = bounded(3.0, 0, MAX_WEIGHT)  # classifier-free guidance scale; 1: none
    # distill: a few-step student of a diffusion run (one phase, TRACT-style: arXiv 2303.04248)
    #: a diffusion run dir: the teacher, whose EMA weights the student starts from. The student samples in
    #: sample_steps DDIM steps (sampler=ddim) of one pass each, the teacher's guidance `guidance` baked in
    teacher: str = ""
    #: the teacher's guided solver steps per student step: from data noised to the student's timestep, the
    #: student learns where they land at its next timestep
    teacher_substeps: int = bounded(4, 1, 1000)
    teacher_sampler: Literal["ddim", "dpm++"] = "dpm++"  # DPM-Solver++(2M) within each student step, or DDIM
    # quality while training, with artscale eval's Inception features (artscale/train/quality.py)
    #: every eval_every steps (0: off), KID, and FID from 2048 images a side, against the val split.
    #: Diffusion: the EMA model draws eval_samples images per class with the sampler above;
    #: reconstruct: its outputs of the val images
    eval_every: int = bounded(0, 0, MAX_STEPS)
    eval_samples: int = bounded(100, 2, MAX_COUNT)  # per class (diffusion); split across ranks
    #: "": torch-fidelity's file in torch's hub cache, as artscale eval finds it | a file | random: an
    #: UNTRAINED network, for tests only (the figures mean nothing; logged as a warning)
    eval_inception: str = ""
    # speed
    #: auto: bf16 on a GPU with it (fp16 on one without), bf16 on a CPU with native bf16 (avx512_bf16, AMX),
    #: fp32 elsewhere: emulated bf16 is several times slower than fp32. The default is the article's fp32.
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    #: auto: on for the article's model (its BatchNorm convs run faster in it), off for the diffusion UNet,
    #: whose GroupNorms run in the contiguous layout on CUDA, so each would convert its input and output
    channels_last: Literal["auto", True, False] = "auto"
    compile: bool = False  # torch.compile, applied by accelerate to the DDP-wrapped model (see setup.py)
    #: DataLoader workers per process; -1: 0 on CPU, where a worker only takes cores from the step
    #: (bench/train_step.py), and up to 4 on a GPU, which decoding must keep fed
    num_workers: int = bounded(-1, -1, 1024)
    hflip: bool = False  # random horizontal flip of training images
    # policies, in optimizer steps
    log_every: int = bounded(10, 1, MAX_STEPS)  # a line in metrics.jsonl, the tracker and the progress output
    sample_every: int = bounded(500, 1, MAX_STEPS)  # a sample grid in samples/ and the tracker
    val_every: int = bounded(500, 1, MAX_STEPS)  # validation over the val split
    val_batches: int = bounded(0, 0, MAX_STEPS)  # batches per rank at each validation; 0: the whole val split
    #: a checkpoint in checkpoints/step-XXXXXX (and always at the last step)
    checkpoint_every: int = bounded(1000, 1, MAX_STEPS)
    keep_checkpoints: int = bounded(3, 1, MAX_STEPS)  # the newest this many are kept
    # tracking
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"  # wandb runs offline without credentials
    wandb_project: str = "artscale"  # W&B's project; tensorboard: the folder under run_dir
    run_name: str = ""  # the W&B run's name; "": the run dir's name
    tags: list[str] = field(default_factory=list)  # W&B tags, comma-separated on the command line
    # runtime
    seed: int = bounded(0, 0, 2**32 - 1)  # model init, data order, noise and label drops (32 bits, numpy's)
    resume: str = "latest"  # latest | a checkpoint path | "" (start fresh; refused if run_dir has checkpoints)
    force: bool = False  # allow a run_dir whose saved config differs
    #: a rank waiting longer than this on its peers fails instead of hanging
    pg_timeout_s: int = bounded(600, 1, 10**7)

    def __post_init__(self) -> None:
        diffusion = self.objective in ("diffusion", "distill")
        if self.perceptual_weight == -1.0:
            self.perceptual_weight = 0.0 if diffusion else 1.0
        if self.ema_decay == -1.0:
            self.ema_decay = 0.9999 if diffusion else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def use_channels_last(self) -> bool:
        """channels_last as given, or for `auto` by the objective: the article's model only."""
        return self.channels_last if isinstance(self.channels_last, bool) else self.objective == "reconstruct"


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Turn a YAML value or a CLI string into the field's type, or say clearly why not."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value is False and "no" in choices:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if True in choices and not isinstance(value, bool):  # a choice of auto, true or false
            text = str(value).strip().lower()
            value = True if text in _TRUE else False if text in _FALSE else value
        if value not in choices:
            names = (str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            raise UserError(f"config {name}={value!r}: choose one of {', '.join(names)}")
        return value
    if origin in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
        origin = get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UserError(f"config {name}={value!r}: expected true or false")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"config {name}={value!r}: expected a list")
        if get_args(hint) == (int,):
            try:
                return [int(v) for v in value]
            except (TypeError, ValueError):
                raise UserError(f"config {name}={value!r}: expected a list of integers") from None
        return [str(v) for v in value]
    if isinstance(value, (dict, list)):
        raise UserError(f"config {name}={value!r}: expected {hint.__name__}, not a {type(value).__name__}")
    try:
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError):  # int(float("1e400")) overflows
        raise UserError(f"config {name}={value!r}: expected {hint.__name__}") from None
    raise TypeError(f"unhandled config type {hint} for {name}")


def _check_ranges(cfg: TrainConfig, given: dict[str, Any], origins: dict[str, str]) -> None:
    """Every bounded field finite and in its range (`bounded` beside the field says which); a message
    shows the value as given (`batch_size=1e30`) and as read."""
    values = cfg.to_dict()
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        if "range" not in f.metadata:
            continue
        low, high, low_open = f.metadata["range"]
        try:
            checked(values, f.name, hints[f.name], "", low=low, high=high, low_open=low_open)
        except BadFile as e:
            shown = printable(str(given.get(f.name, values[f.name])))[:60]
            raise _at(origins.get(f.name, ""), f"config {f.name}={shown}: {e.problem}") from None


def _at(origin: str, message: str) -> UserError:
    """A config error, naming the file its value came from (none for the command line)."""
    return UserError(f"{origin}: {message}" if origin else message)


def _validate(cfg: TrainConfig) -> TrainConfig:
    """What one field's range cannot say (the ranges themselves: `_check_ranges`)."""
    if not multiple_of_8(cfg.image_size):
        raise UserError(f"config image_size={cfg.image_size}: must be a positive multiple of 8")
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("config: set epochs > 0 or max_steps > 0")
    if cfg.num_workers < -1:
        raise UserError(f"config num_workers={cfg.num_workers}: must be >= 0, or -1 (chosen for the device)")
    _validate_diffusion(cfg)
    _validate_distill(cfg)
    return cfg


def _validate_diffusion(cfg: TrainConfig) -> None:
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"config ema_decay={cfg.ema_decay}: must be in [0, 1) (0 turns EMA off)")
    if not 0.0 <= cfg.cond_drop < 1.0:
        raise UserError(f"config cond_drop={cfg.cond_drop}: must be in [0, 1)")
    if any(not 0 < c <= MAX_CHANNELS for c in cfg.block_out_channels) or len(cfg.block_out_channels) > 8:
        raise UserError(
            f"config block_out_channels={cfg.block_out_channels}: up to 8 levels of 1 to {MAX_CHANNELS} channels "
            "([]: the preset's)"
        )
    if cfg.zero_terminal_snr and cfg.prediction_type == "epsilon":
        raise UserError(
            "config zero_terminal_snr=true needs prediction_type=v_prediction (epsilon is undefined at zero SNR)"
        )


def _validate_distill(cfg: TrainConfig) -> None:
    if cfg.objective != "distill":
        return
    if not cfg.teacher:
        raise UserError("config objective=distill needs teacher=RUN_DIR (a diffusion run dir)")
    if cfg.sampler != "ddim":
        raise UserError(f"config sampler={cfg.sampler}: a distilled student samples with ddim (its training's steps)")
    if cfg.guidance < 1:
        raise UserError(f"config guidance={cfg.guidance}: the guidance a student learns must be >= 1 (1: none)")


def _read_file(p: Path) -> dict[str, Any]:
    """A YAML (or JSON) config file's mapping, or one line saying why not."""
    try:
        loaded = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"config file {p} nests too deep to be a config") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {p} must hold a mapping of key: value")
    odd = next((k for k in loaded if not isinstance(k, str)), None)
    if odd is not None:
        raise UserError(f"config file {p}: key {printable(repr(odd))[:60]} is not a name (keys are text)")
    return loaded


def _build(values: dict[str, Any], origins: dict[str, str]) -> TrainConfig:
    """TrainConfig from raw values (YAML, JSON or command-line text), each coerced, then every range checked."""
    hints = get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"unknown config key {', '.join(unknown)}; valid keys: {', '.join(hints)}")
    coerced = {}
    for k, v in values.items():
        try:
            coerced[k] = _coerce(k, hints[k], v)
        except UserError as e:
            raise _at(origins.get(k, ""), str(e)) from None
    cfg = TrainConfig(**coerced)
    _validate(cfg)
    _check_ranges(cfg, values, origins)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML (or JSON) file at `path` (or the preset of that name), then `key=value`
    overrides, validated."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # key -> the file it came from ("" for the command line)
    if path:
        p = resolve_config(path)
        loaded = _read_file(p)
        values.update(loaded)
        origins.update(dict.fromkeys(loaded, str(p)))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"expected key=value, got {item!r}")
        key = key.strip().replace("-", "_")
        values[key], origins[key] = value, ""
    return _build(values, origins)


def saved_config(path: Path) -> dict[str, Any] | None:
    """A run dir's or checkpoint's config.json, checked as a config file is (types, ranges), or None
    where there is none: the keys it holds, coerced. Keys this version does not know are left out (a
    config from another version)."""
    saved = read_json(path)
    if saved is None:
        return None
    known = {k: v for k, v in saved.items() if k in get_type_hints(TrainConfig)}
    try:
        checked_values = _build(known, dict.fromkeys(known, str(path))).to_dict()
        return {k: checked_values[k] for k in known}
    except UserError as e:
        text = str(e)
        raise UserError(text if text.startswith(str(path)) else f"{path}: {text}") from None


def train_parser() -> argparse.ArgumentParser:
    """The arguments of `artscale train`, `python -m artscale.train` and `accelerate launch launch/train.py`."""
    parser = argparse.ArgumentParser(
        prog="artscale train",
        description="train (same code as python -m artscale.train, accelerate launch -m artscale.train, "
        "accelerate launch launch/train.py)",
    )
    parser.add_argument(
        "--config", default=None, help="a YAML file of config keys, or a packaged preset's name (artscale configs)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config keys (docs/reference/config.md); override the file"
    )
    return parser

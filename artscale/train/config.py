"""Training configuration: the article's values as defaults, a YAML file, then key=value overrides.

`load_config` is a pure function shared by `artscale train`, `python -m artscale.train`, `launch/train.py`,
the sbatch scripts and `artscale submit`; `--config` takes a YAML file or a packaged preset's name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from artscale.core.errors import UserError
from artscale.core.system import multiple_of_8
from artscale.train.presets import resolve_config


@dataclass
class TrainConfig:
    # data and places
    data: str = "shards/demo"  # a shards dir (with manifest.json) or a webdataset URL pattern
    run_dir: str = "runs/default"  # checkpoints/, samples/, wandb/, final/ go here
    image_size: int = 128  # training resolution; must match the shards (multiple of 8)
    # optimisation (the article: Adam 1e-3, StepLR(30 epochs, 0.1), 150 epochs, batch 32)
    batch_size: int = 32  # per process
    lr: float = 1e-3
    scale_lr: bool = False  # multiply lr by processes x grad_accum (never done silently)
    lr_step_epochs: float = 30  # StepLR period, in epochs, applied per optimizer step
    lr_gamma: float = 0.1
    # step: the article's StepLR above; cosine: from lr down to 0 at the last step (lr_step_epochs and
    # lr_gamma unused), which a short run (the diffusion-cpu preset) ends better with
    lr_schedule: Literal["step", "cosine"] = "step"
    warmup_steps: int = 0  # lr rises linearly over the first steps, then the schedule; 0: none
    epochs: float = 150  # an epoch is the manifest's train count / global batch
    max_steps: int = 0  # > 0 overrides epochs
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0 disables clipping (the grad norm is still logged)
    # objective: `reconstruct` is the article's image-to-image model; `diffusion` trains a class-
    # conditional denoiser (diffusers' UNet2DModel) that draws new images from noise (README: Diffusion)
    # `distill` trains a few-step student of a diffusion run (`teacher`), guidance baked in (README: Distillation)
    objective: Literal["reconstruct", "diffusion", "distill"] = "reconstruct"
    # loss
    perceptual_weight: float = -1.0  # VGG16 term; -1: the objective's default (1.0 reconstruct, 0 diffusion,
    # where it applies to the predicted clean image at low-noise timesteps only)
    vgg_weights: str = "imagenet"  # imagenet | a local torchvision VGG16 .pth/.safetensors | random
    # diffusion: the denoiser (a preset, or its parts; explicit values override the preset's)
    denoiser: Literal["tiny", "small", "base"] = "tiny"
    block_out_channels: list[int] = field(default_factory=list)  # channels per UNet level; []: the preset's
    layers_per_block: int = 0  # 0: the preset's
    norm_num_groups: int = 0  # GroupNorm groups; 0: the preset's
    # diffusion: the forward process and the loss
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"
    beta_schedule: Literal["squaredcos_cap_v2", "linear"] = "squaredcos_cap_v2"  # cosine by default
    zero_terminal_snr: bool = False  # rescale betas so the last timestep is pure noise (needs v_prediction)
    min_snr_gamma: float = 0.0  # min-SNR loss weighting (5 is usual); 0: off
    cond_drop: float = 0.1  # probability a label is dropped to the null class (classifier-free guidance)
    # weights EMA (both objectives), updated on optimizer steps, with a warm-up so early steps are not
    # frozen; used for samples, validation and export. -1: the objective's default (0.9999 diffusion,
    # 0 reconstruct, which keeps the article's run unchanged); 0: off
    ema_decay: float = -1.0
    # diffusion: the sample grids logged every sample_every steps (one row per class, fixed seeds)
    sampler: Literal["ddim", "dpm++"] = "dpm++"
    sample_steps: int = 20
    guidance: float = 3.0  # classifier-free guidance scale; 1: none
    # distill: a student of `teacher` (a diffusion run dir; its EMA weights, which the student starts from) that
    # samples in sample_steps DDIM steps (sampler=ddim) of one pass each, with the teacher's guidance `guidance`
    # baked in. Each step of the student, from data noised to its timestep, learns where teacher_substeps guided
    # steps of teacher_sampler land at its next timestep (one phase, TRACT-style: arXiv 2303.04248).
    teacher: str = ""
    teacher_substeps: int = 4
    teacher_sampler: Literal["ddim", "dpm++"] = "dpm++"  # DPM-Solver++(2M) within each student step, or DDIM
    # quality while training (artscale/train_eval.py): every eval_every steps (0: off) KID, and FID from 2048
    # images a side, against the val split with artscale eval's Inception features. Diffusion: the EMA model
    # draws eval_samples images per class with the sampler above; reconstruct: its outputs of the val images.
    eval_every: int = 0
    eval_samples: int = 100  # per class (diffusion); split across ranks
    eval_inception: str = ""  # "": torch-fidelity's file in torch's hub cache, as artscale eval finds it | a file
    # | random: an UNTRAINED network, for tests only (the figures mean nothing; logged as a warning)
    # speed
    # auto: bf16 on a GPU with it (fp16 on one without), bf16 on a CPU with native bf16 (avx512_bf16, AMX),
    # fp32 elsewhere: emulated bf16 is several times slower than fp32. The default is the article's fp32.
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    # auto: on for the article's model (its BatchNorm convs run faster in it), off for the diffusion UNet, whose
    # GroupNorms run in the contiguous layout on CUDA, so each would convert its input and output
    channels_last: Literal["auto", True, False] = "auto"
    compile: bool = False  # torch.compile, applied by accelerate to the DDP-wrapped model (see train_setup.py)
    num_workers: int = -1  # DataLoader workers per process; -1: 0 on CPU, where a worker only takes cores from
    # the step (bench/train_step.py), and up to 4 on a GPU, which decoding must keep fed
    hflip: bool = False  # random horizontal flip of training images
    # policies, in optimizer steps
    log_every: int = 10
    sample_every: int = 500
    val_every: int = 500
    val_batches: int = 0  # 0: the whole val split
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # tracking
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    wandb_project: str = "artscale"
    run_name: str = ""
    tags: list[str] = field(default_factory=list)
    # runtime
    seed: int = 0
    resume: str = "latest"  # latest | a checkpoint path | "" (start fresh; refused if run_dir has checkpoints)
    force: bool = False  # allow a run_dir whose saved config differs
    pg_timeout_s: int = 600  # a rank waiting longer than this on its peers fails instead of hanging

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
    try:
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise UserError(f"config {name}={value!r}: expected {hint.__name__}") from None
    raise TypeError(f"unhandled config type {hint} for {name}")


def _validate(cfg: TrainConfig) -> TrainConfig:
    if not multiple_of_8(cfg.image_size):
        raise UserError(f"config image_size={cfg.image_size}: must be a positive multiple of 8")
    for name in ("batch_size", "grad_accum", "log_every", "sample_every", "val_every", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"config {name}={getattr(cfg, name)}: must be > 0")
    if cfg.lr <= 0:
        raise UserError(f"config lr={cfg.lr}: must be > 0")
    if cfg.warmup_steps < 0:
        raise UserError(f"config warmup_steps={cfg.warmup_steps}: must be >= 0 (0: no warm-up)")
    if cfg.max_steps < 0 or cfg.epochs < 0 or (cfg.max_steps == 0 and cfg.epochs == 0):
        raise UserError("config: set epochs > 0 or max_steps > 0")
    if cfg.eval_every < 0 or cfg.eval_samples < 2:
        raise UserError(
            f"config eval_every={cfg.eval_every}, eval_samples={cfg.eval_samples}: eval_every must be >= 0 "
            "(0: off) and eval_samples >= 2 (KID compares at least 2 images a side)"
        )
    if cfg.num_workers < -1:
        raise UserError(f"config num_workers={cfg.num_workers}: must be >= 0, or -1 (chosen for the device)")
    _validate_diffusion(cfg)
    _validate_distill(cfg)
    if cfg.keep_checkpoints < 1:
        raise UserError(f"config keep_checkpoints={cfg.keep_checkpoints}: must be >= 1")
    return cfg


def _validate_diffusion(cfg: TrainConfig) -> None:
    if cfg.perceptual_weight < 0:
        raise UserError(f"config perceptual_weight={cfg.perceptual_weight}: must be >= 0")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"config ema_decay={cfg.ema_decay}: must be in [0, 1) (0 turns EMA off)")
    if not 0.0 <= cfg.cond_drop < 1.0:
        raise UserError(f"config cond_drop={cfg.cond_drop}: must be in [0, 1)")
    if cfg.min_snr_gamma < 0:
        raise UserError(f"config min_snr_gamma={cfg.min_snr_gamma}: must be >= 0 (0 turns it off)")
    if any(c <= 0 for c in cfg.block_out_channels) or cfg.layers_per_block < 0 or cfg.norm_num_groups < 0:
        raise UserError(
            "config block_out_channels, layers_per_block, norm_num_groups: must be positive (0 or []: the preset's)"
        )
    if cfg.sample_steps < 1:
        raise UserError(f"config sample_steps={cfg.sample_steps}: must be >= 1")
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
    if cfg.teacher_substeps < 1:
        raise UserError(f"config teacher_substeps={cfg.teacher_substeps}: must be >= 1")
    if cfg.guidance < 1:
        raise UserError(f"config guidance={cfg.guidance}: the guidance a student learns must be >= 1 (1: none)")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML (or JSON) file at `path` (or the preset of that name), then `key=value`
    overrides, validated."""
    hints = get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    if path:
        p = resolve_config(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping of key: value")
        values.update(loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"expected key=value, got {item!r}")
        values[key.strip().replace("-", "_")] = value
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"unknown config key {', '.join(unknown)}; valid keys: {', '.join(hints)}")
    cfg = TrainConfig(**{k: _coerce(k, hints[k], v) for k, v in values.items()})
    return _validate(cfg)

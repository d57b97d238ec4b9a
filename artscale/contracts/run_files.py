"""The files of a run dir and its checkpoints, one schema each: a reader takes nothing unchecked.

artscale trusts its own command line and nothing it reads: a run dir may come from another user,
another version, a full disk or an attacker on a shared filesystem. Each reader here checks the
types, ranges and finiteness of what it returns, and a bad file is one line naming the file and the
field (`BadFile`, exit 2). The run dir's layout and the weights are in artscale.contracts.run_dir.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from artscale.core.checks import BadFile, field, mapping, printable, safe_component
from artscale.core.system import multiple_of_8

MAX_STEP = 10**12
MAX_IMAGE_SIZE = 16384
# Every logged figure is a float32 (a loss, an lr) or a count: a larger finite value is not one
# training wrote. NaN and inf are kept: a diverged run logs them, and that is what its report must show.
MAX_METRIC = 3.5e38
# Files accelerate's save_state writes that load_state unpickles (with torch.load(weights_only=True)).
# What a diffusion model says it samples with (denoiser.json's and the ONNX metadata's `sampling`,
# a student's `distilled`, the training config's sampler keys): the samplers artscale has, and ranges
# beyond which no run of it trains.
SAMPLERS = ("ddim", "dpm++")
MAX_SAMPLE_STEPS = 10_000
MAX_GUIDANCE = 1e6
MAX_SUBSTEPS = 1000
ACCELERATE_PICKLES = re.compile(r"^(optimizer|scheduler|sampler|dl_state_dict|scaler|random_states|custom_checkpoint)")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None where there is no file; BadFile where it holds no JSON object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadFile(path, "the file", f"is not UTF-8 text (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise BadFile(path, "the file", f"is not JSON ({str(e).splitlines()[0][:80]})") from None
    except OSError as e:
        raise BadFile(path, "the file", f"cannot be read ({e.strerror or e})") from None
    return mapping(data, path)


def read_state(path: Path) -> dict[str, Any] | None:
    """trainer_state.json: the step a checkpoint (or final/) was saved at and what a resume restores."""
    state = read_json(path)
    if state is None:
        return None
    field(state, "step", int, path, low=0, high=MAX_STEP)
    for key in ("skipped_samples", "ema_step", "total_steps"):
        field(state, key, int, path, low=0, high=MAX_STEP, default=None)
    for key in ("world_size", "global_batch", "steps_per_epoch"):
        field(state, key, int, path, low=1, high=MAX_STEP, default=None)
    return state


def read_config(path: Path) -> dict[str, Any] | None:
    """config.json (the run's TrainConfig as saved), with the keys export, report and info take from it
    checked. Training checks it whole, ranges too (artscale.train.config.saved_config)."""
    config = read_json(path)
    if config is None:
        return None
    size = field(config, "image_size", int, path, low=8, high=MAX_IMAGE_SIZE, default=None)
    if size is not None and not multiple_of_8(size):
        raise BadFile(path, "image_size", f"must be a multiple of 8, not {size}")
    for key in ("data", "objective", "mixed_precision", "run_dir"):
        field(config, key, str, path, default=None)
    for key in ("batch_size", "grad_accum", "max_steps"):
        field(config, key, int, path, low=0, high=MAX_STEP, default=None)
    for key in ("lr", "epochs"):
        field(config, key, float, path, low=0, default=None)
    check_sampler_keys(config, path)
    return config


def _sampler(record: dict[str, Any], key: str, path: Path | str, where: str, required: bool = True) -> str | None:
    """record[key]: one of SAMPLERS (or absent, where not required)."""
    value = field(record, key, str, path, where=where, **({} if required else {"default": None}))
    if value is not None and value not in SAMPLERS:
        raise BadFile(path, f"{where}{key}", f"must be one of {', '.join(SAMPLERS)}, not {printable(repr(value))[:40]}")
    return value


def check_sampler_keys(config: dict[str, Any], path: Path | str, where: str = "") -> dict[str, Any]:
    """A training config's sampler, sample_steps and guidance (what an older model samples with), where present."""
    _sampler(config, "sampler", path, where, required=False)
    field(config, "sample_steps", int, path, low=1, high=MAX_SAMPLE_STEPS, default=None, where=where)
    field(config, "guidance", float, path, low=0, high=MAX_GUIDANCE, default=None, where=where)
    return config


def check_sampling(value: Any, path: Path | str, name: str = "sampling") -> dict[str, Any] | None:
    """A model's `sampling` record ({sampler, steps, guidance, guidance_baked}), or None where it has none."""
    if value is None:
        return None
    record, where = mapping(value, path, name), f"{name}."
    _sampler(record, "sampler", path, where)
    field(record, "steps", int, path, low=1, high=MAX_SAMPLE_STEPS, where=where)
    field(record, "guidance", float, path, low=0, high=MAX_GUIDANCE, where=where)
    field(record, "guidance_baked", bool, path, default=False, where=where)
    return record


def check_distilled(value: Any, path: Path | str, name: str = "distilled") -> dict[str, Any] | None:
    """A distilled student's record (its teacher's path, step and weights, its steps, the teacher's substeps,
    sampler and the guidance baked in), or None for a model that is no student. The teacher's path is shown
    by info and report: text without control characters."""
    if value is None:
        return None
    record, where = mapping(value, path, name), f"{name}."
    teacher = field(record, "teacher", str, path, where=where)
    if not teacher or printable(teacher) != teacher:
        raise BadFile(
            path, f"{where}teacher", f"must be a path without control characters, not {printable(repr(teacher))[:80]}"
        )
    field(record, "teacher_step", (int, type(None)), path, low=0, high=MAX_STEP, default=None, where=where)
    if field(record, "teacher_weights", str, path, where=where) not in ("ema", "raw"):
        raise BadFile(path, f"{where}teacher_weights", "must be ema or raw")
    field(record, "steps", int, path, low=1, high=MAX_SAMPLE_STEPS, where=where)
    field(record, "teacher_substeps", int, path, low=1, high=MAX_SUBSTEPS, where=where)
    _sampler(record, "teacher_sampler", path, where)
    field(record, "guidance", float, path, low=1, high=MAX_GUIDANCE, where=where)
    field(record, "guidance_input", bool, path, default=False, where=where)
    return record


UNET_INTS = ("sample_size", "layers_per_block", "norm_num_groups", "num_class_embeds", "in_channels", "out_channels")


def read_denoiser(path: Path) -> dict[str, Any] | None:
    """denoiser.json: the UNet and scheduler configs, the class names (each becomes a folder: one safe
    path component), the null label, the prediction type and the image size."""
    meta = read_json(path)
    if meta is None:
        return None
    unet = mapping(field(meta, "unet", dict, path), path, "unet")
    for key in UNET_INTS:
        field(unet, key, int, path, low=0, high=MAX_IMAGE_SIZE, default=None, where="unet.")
    channels = field(unet, "block_out_channels", list, path, default=[], where="unet.")
    for i, c in enumerate(channels):
        field({"c": c}, "c", int, path, low=1, high=MAX_IMAGE_SIZE, where=f"unet.block_out_channels[{i}]")
    scheduler = mapping(field(meta, "scheduler", dict, path), path, "scheduler")
    field(scheduler, "num_train_timesteps", int, path, low=1, high=100_000, default=None, where="scheduler.")
    classes = field(meta, "classes", list, path)
    for i, name in enumerate(classes):
        safe_component(name, path, f"classes[{i}]")
    field(meta, "null_label", int, path, low=len(classes), high=len(classes))
    field(meta, "prediction_type", str, path)
    size = field(meta, "image_size", int, path, low=8, high=MAX_IMAGE_SIZE)
    if not multiple_of_8(size):
        raise BadFile(path, "image_size", f"must be a multiple of 8, not {size}")
    check_sampling(meta.get("sampling"), path)
    check_distilled(meta.get("distilled"), path)
    return meta


def check_metric(row: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    """One metrics.jsonl entry: a step (int >= 0) and numbers (float32's range, or NaN/inf from a
    diverged run); anything else names the line and the key."""
    where = f"line {line} "
    field(row, "step", int, path, low=0, high=MAX_STEP, where=where)
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            field(row, key, float, path, where=where)  # says what it is instead
        if not (isinstance(value, float) and not math.isfinite(value)) and abs(value) > MAX_METRIC:
            raise BadFile(path, f"{where}{key}", f"must be within +-{MAX_METRIC:g} (a float32), not {value:g}")
    return row


def read_metrics_counted(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl's entries and how many lines were left out as unreadable: a line that is not JSON
    (the torn last line of a killed run). A JSON line that breaks the schema is a BadFile."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict):
            rows.append(check_metric(row, path, number))
        else:
            bad += 1
    return rows, bad


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's entries; a line that is not JSON (the torn last line of a killed run) is left out."""
    return read_metrics_counted(path)[0]


def broken_pickle(folder: Path, pattern: str = "") -> str:
    """Which of accelerate's files in a checkpoint (those whose name starts with `pattern`) `load_state`
    cannot load, and why, in words for the user ("" where each loads). Called after a load failed (it
    opens each file once more), and before, on the RNG states, whose failure accelerate only logs."""
    import pickle
    import zipfile

    from accelerate.utils import load  # torch.load(weights_only=True) with the numpy types RNG states hold

    for p in sorted(folder.iterdir()):
        if not ACCELERATE_PICKLES.match(p.name) or not p.name.startswith(pattern):
            continue
        if p.name.startswith("custom_checkpoint"):  # accelerate unpickles these with weights_only=False
            return f"{p.name} is not a file artscale writes"
        try:
            load(p, map_location="cpu")
        except pickle.UnpicklingError:
            return f"{p.name} holds objects other than tensors (refused: loading it could run code)"
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
            return f"{p.name} is truncated or not a torch file"
    return ""

"""A diffusion run in diffusers' own format: what `UNet2DModel.from_pretrained` and `DDPMScheduler.from_pretrained` load.

    OUT/unet/           UNet2DModel.save_pretrained: config.json, diffusion_pytorch_model.safetensors
    OUT/scheduler/      the run's training DDPMScheduler: scheduler_config.json
    OUT/artscale.json   classes, null label, size, step, source: what a sampling loop needs, machine-readable
    OUT/README.md       the model card: classes with their label index, the null label, size, prediction
                        type, steps trained, how to sample, and the grid below
    OUT/samples.png     one row per class, drawn from the exported weights with the run's sampler, steps and
                        guidance: row c, column i is `artscale sample RUN_DIR --seed S` image i of class c

No model_index.json: diffusers' DDPMPipeline is unconditional (it cannot pass class labels), so the card
shows the loop instead. OUT is built in OUT.tmp-PID, read back and compared with the run's weights, then
renamed into place; an existing OUT is replaced only when it is an earlier export of this kind (it holds
artscale.json saying so), never another folder.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artscale import __version__
from artscale.contracts.run_dir import CONFIG_NAME, EMA_NAME, WEIGHTS_NAME, is_diffusion_source, load_denoiser
from artscale.contracts.run_files import read_config
from artscale.core.atomic import fresh_dir, remove_tree, write_atomic
from artscale.core.errors import UserError
from artscale.data.grids import grid_image
from artscale.data.shard_writer import sha256_file
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import sample, to_uint8, torch_predict
from artscale.diffusion.schedulers import make_sampler

MARKER = "artscale.json"
GRID_NAME = "samples.png"
GRID_BATCH = 16  # images per sampling batch: `artscale sample`'s on CPU, so the grid matches its images


def _check_out(out: Path) -> None:
    """OUT may be new, empty, or an earlier diffusers export (replaced); anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: give a folder for the diffusers export")
    if not any(out.iterdir()):
        return
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != "diffusers":
        raise UserError(
            f"{out} is a folder that holds other files (not an earlier `--format diffusers` export): "
            "give a new or empty folder"
        )


def _remove_leftovers(out: Path) -> None:
    """OUT.tmp-PID / OUT.old-PID of an export that was killed (its process is gone)."""
    for path in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        kind, _, pid = path.name[len(out.name) + 1 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            remove_tree(path)
        except OSError:
            pass  # alive under another user: not ours to remove


def _readable(folder: Path) -> None:
    """Files as the umask allows (save_pretrained leaves its weights owner-only): others on a shared
    filesystem load them too."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _run_config(folder: Path) -> dict[str, Any]:
    return read_config(folder / CONFIG_NAME) or {}


def draw_grid(
    unet: torch.nn.Module,
    scheduler_config: dict[str, Any],
    num_classes: int,
    null_label: int,
    *,
    count: int,
    sampler: str,
    steps: int,
    guidance: float,
    seed: int,
) -> np.ndarray:
    """uint8 [classes, count, H, W, 3]: image i of class c starts from noise (seed, i), as in `artscale sample`,
    in batches of `artscale sample`'s CPU size taken in its order (class by class)."""
    size = int(unet.config.sample_size)
    device = next(unet.parameters()).device
    order = [(c, i) for c in range(num_classes) for i in range(count)]
    out = np.zeros((num_classes, count, size, size, 3), dtype=np.uint8)
    predict = torch_predict(unet)
    for start in range(0, len(order), GRID_BATCH):
        chunk = order[start : start + GRID_BATCH]
        noise = noise_for(seed, [i for _, i in chunk], (3, size, size)).to(device)
        labels = torch.tensor([c for c, _ in chunk])
        x = sample(
            predict, make_sampler(sampler, scheduler_config), noise, labels, null_label, steps=steps, guidance=guidance
        )
        for (c, i), pixels in zip(chunk, to_uint8(x)):
            out[c, i] = pixels
    return out


def _usage(info: dict[str, Any]) -> str:
    """The card's sampling loop: what `artscale sample` does, in diffusers' terms only."""
    size, null = info["image_size"], info["null_label"]
    if info["grid"]["sampler"] == "ddim":
        scheduler = (
            "DDIMScheduler.from_pretrained(\n"
            '    folder, subfolder="scheduler", timestep_spacing="trailing", clip_sample=False\n)'
        )
        name = "DDIMScheduler"
    else:
        scheduler = (
            "DPMSolverMultistepScheduler.from_pretrained(\n"
            '    folder, subfolder="scheduler", algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"\n)'
        )
        name = "DPMSolverMultistepScheduler"
    return f"""```python
import torch
from diffusers import {name}, UNet2DModel

folder = "."  # this folder, or its Hub repo id
unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
scheduler = {scheduler}
label, count, steps, guidance = 0, 4, {info["grid"]["steps"]}, {info["grid"]["guidance"]}  # label: a class index above
x = torch.randn(count, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
labels = torch.tensor([label] * count + [{null}] * count)  # {null}: the null label (unconditional)
scheduler.set_timesteps(steps)
with torch.no_grad():
    for t in scheduler.timesteps:
        cond, uncond = unet(torch.cat([x, x]), t, class_labels=labels).sample.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
images = (x.clamp(-1, 1) + 1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [count, H, W, 3] RGB
```"""


def model_card(info: dict[str, Any], unet_config: dict[str, Any]) -> str:
    """README.md of the export: YAML front matter for the Hub, then what a user needs to sample from it."""
    classes = info["classes"]
    rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(classes))
    attention = [i for i, kind in enumerate(unet_config["down_block_types"]) if kind.startswith("Attn")]
    size, levels = info["image_size"], len(unet_config["block_out_channels"])
    where = ", ".join(f"{size // 2**i}x{size // 2**i}" for i in attention)
    where = f"self-attention at {where} and in the middle block" if where else "self-attention in the middle block only"
    grid = info["grid"]
    if grid["count"]:
        picture = (
            f"![samples]({GRID_NAME})\n\n"
            f"One row per class, in label order; {grid['count']} images each, drawn from these weights "
            f"({info['weights']}) with {grid['sampler']}, {grid['steps']} steps, guidance {grid['guidance']}. "
            f"Column i is image i of `artscale sample RUN_DIR OUT --count {grid['count']} --sampler {grid['sampler']} "
            f"--steps {grid['steps']} --guidance {grid['guidance']} --seed {grid['seed']}`: artscale draws image i's "
            "noise from (seed, i) alone (`artscale.diffusion.noise_for`)."
        )
    else:
        picture = "No sample grid was drawn (`--grid-count 0`)."
    step = info["step"] if info["step"] is not None else "unknown"
    return f"""---
library_name: diffusers
tags:
- diffusers
- class-conditional
- artscale
---

# A class-conditional pixel-space diffusion model ({size} px)

Trained with artscale (`objective=diffusion`) for {step} steps and exported with
`artscale export RUN_DIR OUT --format diffusers`. `unet/` is a diffusers `UNet2DModel` ({levels} levels,
{where}, {info["parameters"]:,} parameters; the {info["weights"]} weights), `scheduler/` the
`DDPMScheduler` it was trained with.

| | |
| --- | --- |
| image size | {size} x {size} RGB, pixels in [-1, 1] |
| prediction type | {info["prediction_type"]} |
| noise schedule | {info["beta_schedule"]}, {info["num_train_timesteps"]} training timesteps |
| steps trained | {step} |
| weights | {info["weights"]} (`{info["source"]}`, sha256 {info["source_sha256"][:16]}...) |
| null label | {info["null_label"]} (the unconditional class, for classifier-free guidance) |

## Classes

Pass a class's label as `class_labels`; label {info["null_label"]} is the null class.

| label | class |
| --- | --- |
{rows}
| {info["null_label"]} | (null: unconditional) |

## Sampling

{_usage(info)}

## Samples

{picture}
"""


def _read_back(folder: Path, unet: torch.nn.Module, scheduler: Any) -> torch.nn.Module:
    """The written UNet, loaded as a user would; refuses an export that does not hold the run's weights."""
    from diffusers import DDPMScheduler, UNet2DModel

    loaded = UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    theirs, ours = loaded.state_dict(), unet.state_dict()
    if theirs.keys() != ours.keys() or any(not torch.equal(theirs[k], ours[k]) for k in ours):
        raise UserError(f"{folder / 'unet'} does not read back as the run's weights; nothing written")
    back = DDPMScheduler.from_pretrained(str(folder / "scheduler")).config
    if any(back[k] != v for k, v in scheduler.config.items() if not k.startswith("_")):
        raise UserError(f"{folder / 'scheduler'} does not read back as the run's scheduler; nothing written")
    return loaded


def export_diffusers(
    source: str | Path,
    out: str | Path,
    *,
    weights: str | None = None,
    grid_count: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a diffusion run's denoiser and scheduler as diffusers' folders, with a model card, to OUT.

    `weights`: ema, raw, or None (the EMA where the run kept one). `grid_count` images per class in the
    card's grid (0: none), drawn on a GPU where torch sees one."""
    from diffusers import DDPMScheduler

    from artscale.data.images import encode_image

    source, out = Path(source), Path(out)
    if not source.exists():
        raise UserError(f"{source} not found (a diffusion run dir, a checkpoint dir or final/)")
    if not is_diffusion_source(source):
        raise UserError(
            f"{source} is not a diffusion run: the article's reconstruct model has no diffusers format (use --format onnx)"
        )
    if grid_count < 0:
        raise UserError(f"--grid-count {grid_count}: must be >= 0 (0: no sample grid)")
    _check_out(out)
    unet, meta = load_denoiser(source, weights)
    if meta.get("distilled"):  # diffusers' pipelines would apply guidance on top of the baked-in one
        raise UserError(
            f"{source} is a distilled student (guidance baked in): export it to ONNX, not --format diffusers"
        )
    folder = Path(meta["path"])
    config = _run_config(folder)
    scheduler = DDPMScheduler.from_config(meta["scheduler"])
    weights_file = folder / (EMA_NAME if meta["weights"] == "ema" else WEIGHTS_NAME)
    classes = [str(c) for c in meta["classes"]]
    info: dict[str, Any] = {
        "format": "diffusers",
        "artscale_version": __version__,
        "classes": classes,
        "null_label": int(meta["null_label"]),
        "image_size": int(meta["image_size"]),
        "prediction_type": str(meta["prediction_type"]),
        "beta_schedule": scheduler.config.beta_schedule,
        "num_train_timesteps": scheduler.config.num_train_timesteps,
        "step": meta.get("step"),
        "weights": meta["weights"],
        "parameters": sum(p.numel() for p in unet.parameters()),
        "source": str(weights_file),
        "source_sha256": sha256_file(weights_file),
        "denoiser": config.get("denoiser", ""),
        "grid": {
            "count": grid_count,
            "sampler": config.get("sampler", "dpm++"),
            "steps": int(config.get("sample_steps", 20)),
            "guidance": float(config.get("guidance", 3.0)),
            "seed": seed,
        },
    }

    _remove_leftovers(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fresh_dir(tmp)  # made here, not through a link planted at the name
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        loaded = _read_back(tmp, unet, scheduler)
        if grid_count:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            g = info["grid"]
            print(
                f"drawing the model card's grid: {grid_count} x {len(classes)} images, {g['sampler']} {g['steps']} "
                f"steps, guidance {g['guidance']}, on {device.type}"
            )
            images = draw_grid(
                loaded.to(device),
                dict(scheduler.config),
                len(classes),
                info["null_label"],
                count=grid_count,
                sampler=g["sampler"],
                steps=g["steps"],
                guidance=g["guidance"],
                seed=seed,
            )
            write_atomic(
                tmp / GRID_NAME, encode_image(grid_image(images.reshape(-1, *images.shape[2:]), grid_count), "png")
            )
        write_atomic(tmp / MARKER, json.dumps(info, indent=2) + "\n")
        write_atomic(tmp / "README.md", model_card(info, dict(loaded.config)))
        _readable(tmp)
        if out.exists():
            out.replace(old)
        tmp.replace(out)
        remove_tree(old)
    except OSError as e:  # a full disk or a read-only place: what was there stays
        if old.exists() and not out.exists():
            old.replace(out)
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        remove_tree(tmp)
    print(
        f"exported {out} (diffusers: unet/, scheduler/, README.md; {info['weights']} weights, "
        f"{info['image_size']} px, step {info['step'] if info['step'] is not None else '?'}, {len(classes)} classes)"
    )
    return {"path": str(out), **info}

"""`artscale export RUN OUT --format diffusers`: read back by diffusers itself, sampled like `artscale sample`,
its model card, and the folder written whole or not at all."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artscale.contracts.run_dir import load_denoiser
from artscale.core.errors import UserError
from artscale.data.grids import enlarge_factor
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import sample, to_uint8, torch_predict
from artscale.diffusion.schedulers import make_sampler
from artscale.export.diffusers import export_diffusers


def card_classes(card: str) -> dict[int, str]:
    """The model card's `| label | class |` rows."""
    return {int(i): name for i, name in re.findall(r"^\| (\d+) \| ([^|]+?) \|$", card, re.M)}


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
def test_a_trained_run_round_trips_through_diffusers(art_shards, tmp_path, monkeypatch, train_cli, tiny, run_cli):
    """3 real training steps; the export, loaded by UNet2DModel/DDPMScheduler.from_pretrained, draws what
    `artscale sample RUN_DIR` draws for the same seeds, and the card's grid is those same images."""
    from diffusers import DDPMScheduler, UNet2DModel

    run, out = tmp_path / "run", tmp_path / "hub"
    trained = train_cli(tiny(run, art_shards, "objective=diffusion", "batch_size=8", "max_steps=3", "sample_steps=4"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = run_cli("export", run, out, "--format", "diffusers", "--grid-count", "2")
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "run"]  # no temporary folder left

    unet = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    saved = json.loads((run / "final" / "denoiser.json").read_text())
    classes = saved["classes"]
    assert scheduler.config.prediction_type == saved["prediction_type"] and unet.config.num_class_embeds == 6
    ema, _ = load_denoiser(run, "ema")
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in unet.state_dict().items())

    sampled = run_cli("sample", run, tmp_path / "s", "--count", "2", "--steps", "4", "--seed", "0", "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr
    labels = torch.arange(len(classes)).repeat_interleave(2)
    noise = noise_for(0, [0, 1] * len(classes), (3, 16, 16))
    x = sample(torch_predict(unet), make_sampler("dpm++", scheduler.config), noise, labels, len(classes), steps=4)
    ours = to_uint8(x).astype(int)
    grid = png(out / "samples.png")
    scale = enlarge_factor(16)
    for k, (c, i) in enumerate((c, i) for c in range(len(classes)) for i in range(2)):
        theirs = png(tmp_path / "s" / classes[c] / f"{i:08d}.png")
        assert np.abs(ours[k] - theirs).max() <= 1, (classes[c], i)
        y0, x0 = 2 + c * (16 * scale + 2), 2 + i * (16 * scale + 2)
        tile = grid[y0 : y0 + 16 * scale : scale, x0 : x0 + 16 * scale : scale]
        assert np.abs(tile - theirs).max() <= 1, ("grid", classes[c], i)
    assert ours.std() > 1  # images, not a constant

    card = (out / "README.md").read_text()
    assert card_classes(card) == {**dict(enumerate(classes)), len(classes): "(null: unconditional)"}
    for text in ("library_name: diffusers", "v_prediction", "| steps trained | 3 |", "16 x 16", "![samples]"):
        assert text in card, text
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.chdir(out)  # the card's snippet loads from "." (the folder it sits in)
    scope: dict = {}
    exec(code, scope)
    assert scope["images"].shape == (4, 16, 16, 3) and scope["images"].dtype == np.uint8


def test_the_folder_is_replaced_whole_or_refused(tmp_path, make_diffusion_run, diffusion_classes):
    run = make_diffusion_run(tmp_path / "run", step=11)
    out = tmp_path / "out"
    first = export_diffusers(run, out, grid_count=0)
    assert first["weights"] == "ema" and first["step"] == 11 and not (out / "samples.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "artscale.json", "scheduler", "unet"]
    assert card_classes((out / "README.md").read_text())[2] == diffusion_classes[2]
    assert os.stat(out / "unet" / "diffusion_pytorch_model.safetensors").st_mode & 0o044  # others may read it

    stale = tmp_path / "out.tmp-999999999"  # a killed export's leftover (no such process)
    stale.mkdir()
    second = export_diffusers(run, out, weights="raw", grid_count=1)  # an earlier export: replaced
    assert second["weights"] == "raw" and second["source_sha256"] != first["source_sha256"]
    assert json.loads((out / "artscale.json").read_text())["weights"] == "raw" and (out / "samples.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier `--format diffusers` export"):
        export_diffusers(run, other, grid_count=0)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="--grid-count -1"):
        export_diffusers(run, tmp_path / "new", grid_count=-1)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_cli_one_line_errors(tmp_path, make_run_dir, run_cli, make_diffusion_run):
    article = make_run_dir(tmp_path / "article")
    result = run_cli("export", article, tmp_path / "out", "--format", "diffusers")
    assert result.returncode == 2 and "has no diffusers format" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    run = make_diffusion_run(tmp_path / "run")
    result = run_cli("export", run, tmp_path / "out", "--format", "diffusers", "--fp16")
    assert result.returncode == 2 and "--format onnx" in result.stderr

"""The denoiser presets' attention, and run dirs from before the presets had it: they load, sample, export
and resume with the structure they were trained with (their denoiser.json records it)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from artscale.contracts.run_dir import load_denoiser
from artscale.core.errors import UserError
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import sample, torch_predict
from artscale.diffusion.schedulers import make_sampler
from artscale.export.article import export_onnx
from artscale.models.denoiser import build_denoiser, preset_denoiser
from artscale.train.checkpoint import resume_denoiser

ROOT = Path(__file__).resolve().parents[2]

NARROW = dict(channels=(16, 32, 32, 64), groups=8)  # `small`'s levels, layers and attention, a fraction of its width


def attention_resolutions(unet: torch.nn.Module, size: int) -> Counter:
    """{(H, W): how many attention layers run at that resolution}, from a forward pass on the meta device."""
    from diffusers.models.attention_processor import Attention

    seen: list[tuple[int, ...]] = []
    for m in unet.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad(), torch.device("meta"):
        unet(torch.zeros(1, 3, size, size), torch.tensor([5]), class_labels=torch.tensor([0]))
    return Counter(seen)


def test_presets_attend_where_ddpm_and_adm_do_at_128_px(diffusion_classes):
    """small: 16x16 (DDPM, diffusers' train_unconditional); base: 32x32 and 16x16 (ADM); tiny: the middle only.
    Down blocks hold layers_per_block attention layers, up blocks one more, the middle block one."""
    built = {}
    for preset in ("tiny", "small", "base"):
        with torch.device("meta"):  # shapes only: no memory, no compute
            built[preset] = preset_denoiser(preset, 128, len(diffusion_classes))
    assert attention_resolutions(built["tiny"], 128) == {(32, 32): 1}
    assert attention_resolutions(built["small"], 128) == {(16, 16): 2 + 1 + 3}
    assert attention_resolutions(built["base"], 128) == {(32, 32): 2 + 3, (16, 16): 2 + 1 + 3}
    assert built["small"].config.attention_head_dim == 64 and built["tiny"].config.attention_head_dim == 8
    assert built["tiny"].config.down_block_types == ("DownBlock2D",) * 3  # unchanged: faster on CPU


def test_attention_needs_whole_heads():
    with pytest.raises(UserError, match="multiples of 64 channels per attention head"):
        build_denoiser(32, 3, (32, 64, 96), 1, 8, attention_levels=1, attention_head_dim=64)


@pytest.mark.slow
def test_an_old_style_run_dir_loads_and_samples_as_it_was(tmp_path, make_diffusion_run, diffusion_classes):
    """A `small` run from before the presets had attention, and the same with a denoiser.json that does not
    even name its block types: both rebuild the old structure and predict alike."""
    run = make_diffusion_run(tmp_path / "run", preset="small", old_structure=True, **NARROW)
    unet, meta = load_denoiser(run)
    assert "Attn" not in "".join(unet.config.down_block_types + unet.config.up_block_types)
    x, t, y = noise_for(1, range(2), (3, 16, 16)), torch.tensor([999, 10]), torch.tensor([0, 3])
    with torch.no_grad():
        want = unet(x, t, class_labels=y).sample
    with pytest.raises(RuntimeError, match="Missing key"):  # today's preset could not hold these weights
        preset_denoiser("small", 16, len(diffusion_classes), NARROW["channels"], 0, 8).load_state_dict(
            unet.state_dict()
        )

    path = run / "final" / "denoiser.json"
    record = json.loads(path.read_text())
    for key in ("down_block_types", "up_block_types", "attention_head_dim"):
        record["unet"].pop(key)
    path.write_text(json.dumps(record))
    again, _ = load_denoiser(run)
    assert again.config.down_block_types == ["DownBlock2D"] * 4 and again.config.attention_head_dim == 8
    with torch.no_grad():
        assert torch.equal(again(x, t, class_labels=y).sample, want)
    images = sample(torch_predict(again), make_sampler("ddim", meta["scheduler"]), x, y, 3, steps=2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_resume_keeps_the_recorded_structure_and_refuses_another_shape(tmp_path, make_diffusion_run, diffusion_classes):
    run = make_diffusion_run(tmp_path / "run", preset="small", old_structure=True, **NARROW)
    fresh = preset_denoiser("small", 16, len(diffusion_classes), NARROW["channels"], 0, 8)
    resumed = resume_denoiser(run / "final", fresh)
    assert resumed.config.down_block_types == ["DownBlock2D"] * 4
    resumed.load_state_dict(load_denoiser(run, "raw")[0].state_dict())  # strict: every key fits
    assert resume_denoiser(tmp_path, fresh) is fresh  # no record: the config's
    with pytest.raises(UserError, match="block_out_channels"):
        resume_denoiser(run / "final", preset_denoiser("tiny", 16, len(diffusion_classes)))


@pytest.mark.slow
def test_an_old_style_run_resumes_under_todays_presets(art_shards, tmp_path, tiny, env, train_cli):
    """Two steps trained by the code as it was (small without attention below the middle block), then the
    same command with today's code continues from step 2 with that structure, not the preset's new one."""
    run = tmp_path / "run"
    narrow = ("block_out_channels=16,32,32,64", "norm_num_groups=8")
    overrides = tiny(run, art_shards, "objective=diffusion", "denoiser=small", *narrow, "checkpoint_every=1")
    old = (
        "import sys; import artscale.models.denoiser as d; d.PRESET_ATTENTION['small'] = (0, 8); "
        "from artscale.train.loop import main; sys.exit(main(sys.argv[1:]))"
    )
    first = subprocess.run(
        [sys.executable, "-c", old, *overrides, "max_steps=2"], env=env(), capture_output=True, text=True, cwd=ROOT
    )
    assert first.returncode == 0, first.stderr[-2000:]
    second = train_cli([*overrides, "max_steps=3", "resume=latest"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 2" in second.stdout + second.stderr
    unet, meta = load_denoiser(run)
    assert meta["step"] == 3 and unet.config.down_block_types == ["DownBlock2D"] * 4


@pytest.mark.slow
def test_a_preset_with_attention_exports_through_the_parity_gate(tmp_path, make_diffusion_run):
    run = make_diffusion_run(tmp_path / "run", preset="small", **NARROW)
    report = export_onnx(run, tmp_path / "m.onnx")
    assert report["parity"]["max_abs_diff"] < 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    recorded = json.loads({p.key: p.value for p in proto.metadata_props}["unet"])
    assert recorded["down_block_types"][-1] == "AttnDownBlock2D" and recorded["attention_head_dim"] == 64
    assert sum(node.op_type == "Softmax" for node in proto.graph.node) == 6  # 2 down, 1 middle, 3 up
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    unet, _ = load_denoiser(run)
    x, t, y = noise_for(2, range(3), (3, 16, 16)), np.array([900, 300, 5]), np.array([0, 1, 3])
    got = session.run(["prediction"], {"sample": x.numpy(), "timestep": t, "class_labels": y})[0]
    with torch.no_grad():
        want = unet(x, torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    assert np.abs(got - want).max() < 1e-4

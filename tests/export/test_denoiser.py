"""Exporting a diffusion run's denoiser: parity with PyTorch, metadata, the gate, --weights.

The run dir is written by hand in the training side's format with random-init weights."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from artscale.contracts.onnx import read_metadata
from artscale.contracts.run_dir import load_denoiser
from artscale.core.errors import UserError
from artscale.diffusion.noise import noise_for
from artscale.diffusion.schedulers import make_sampler, train_scheduler
from artscale.export.article import export_onnx


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_diffusion_run, val_shards):
    root = tmp_path_factory.mktemp("diffexport")
    shards = val_shards(root / "shards", 16, 5)
    run = make_diffusion_run(root / "run", data=str(shards))
    report = export_onnx(run, root / "m.onnx")
    return run, root / "m.onnx", report


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("t", [999, 500, 37, 0])
def test_onnx_prediction_matches_pytorch(exported, batch, t, diffusion_classes):
    run, path, report = exported
    assert report["parity"]["images"].startswith("5 val images from") and report["parity"]["max_abs_diff"] < 1e-4
    unet, _ = load_denoiser(run, "ema")
    x = train_scheduler().add_noise(
        torch.rand(batch, 3, 16, 16) * 2 - 1, noise_for(1, range(batch), (3, 16, 16)), torch.tensor([t] * batch)
    )
    steps, labels = torch.full((batch,), t), torch.arange(batch) % (len(diffusion_classes) + 1)
    with torch.no_grad():
        want = unet(x, steps, class_labels=labels).sample.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["prediction"], {"sample": x.numpy(), "timestep": steps.numpy(), "class_labels": labels.numpy()})
    assert np.abs(got[0] - want).max() < 1e-4


@pytest.mark.slow
def test_metadata_round_trip_and_info(exported, run_cli, diffusion_classes):
    run, path, report = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    saved = json.loads((run / "final" / "denoiser.json").read_text())
    assert meta["classes"] == diffusion_classes and meta["null_label"] == 3 and meta["image_size"] == 16
    assert meta["weights"] == "ema" and meta["step"] == "11" and meta["prediction_type"] == "v_prediction"
    for key, value in saved["scheduler"].items():
        assert key.startswith("_") or meta["scheduler"][key] == value, key
    ours, theirs = make_sampler("dpm++", meta["scheduler"]), make_sampler("dpm++", saved["scheduler"])
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("sample", "tensor(float)"),
        ("timestep", "tensor(int64)"),
        ("class_labels", "tensor(int64)"),
    ]
    assert session.get_inputs()[0].shape == ["N", 3, 16, 16] and session.get_outputs()[0].name == "prediction"
    info = run_cli("info", path)
    assert info.returncode == 0, info.stderr
    for text in ("objective: diffusion", "null_label: 3", "weights: ema", "source_sha256: ", '"ukiyo-e"', "DDPM"):
        assert text in info.stdout, text


@pytest.mark.slow
def test_raw_weights_fp16_and_a_failed_gate(tmp_path, exported):
    run, path, report = exported
    raw = export_onnx(run, tmp_path / "raw.onnx", weights="raw")
    assert raw["weights"] == "raw" and raw["source_sha256"] != report["source_sha256"]
    half = export_onnx(run, tmp_path / "half.onnx", fp16=True)
    assert half["precision"] == "fp16" and 1e-4 < half["parity"]["tolerance"] and half["parity"]["max_abs_diff"] > 0
    cpu = half["parity"]["providers"]["CPUExecutionProvider"]  # the metadata says where the gate ran
    assert cpu == {"max_abs_diff": half["parity"]["max_abs_diff"], "tolerance": half["parity"]["tolerance"]}
    (run / "final" / "ema.safetensors").rename(tmp_path / "ema.safetensors")
    try:
        with pytest.raises(UserError, match="--weights raw"):
            export_onnx(run, tmp_path / "x.onnx", weights="ema")
        assert export_onnx(run, tmp_path / "y.onnx")["weights"] == "raw"  # no --weights: the EMA where kept
    finally:
        (tmp_path / "ema.safetensors").rename(run / "final" / "ema.safetensors")


@pytest.mark.slow
def test_a_failed_parity_gate_writes_nothing(tmp_path, make_diffusion_run, run_cli):
    """conv_in x 1e6 overflows half precision: fp32 PyTorch is fine, the fp16 graph gives inf/NaN."""
    from safetensors.torch import load_file, save_file

    run = make_diffusion_run(tmp_path / "run")
    weights = load_file(str(run / "final" / "ema.safetensors"))
    weights["conv_in.weight"] *= 1e6
    save_file(weights, str(run / "final" / "ema.safetensors"))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous good export")
    result = run_cli("export", run, out, "--fp16")
    assert result.returncode == 2 and "parity gate failed" in result.stderr and "nothing written" in result.stderr
    assert out.read_bytes() == b"the previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "run"]


@pytest.mark.slow
def test_a_real_training_run_exports_and_samples_like_its_torch_model(art_shards, tmp_path, train_cli, tiny):
    """A 3-step diffusion run (accelerate, 1 CPU process): export gates on its val shards, and the ONNX
    samples equal the run dir's torch samples (same seeds) within 2 levels."""
    from PIL import Image

    from artscale.infer.sample import sample_images

    run = tmp_path / "run"
    trained = train_cli(tiny(run, art_shards, "objective=diffusion", "batch_size=8", "max_steps=3"))
    assert trained.returncode == 0, trained.stderr
    report = export_onnx(run, tmp_path / "m.onnx")
    assert report["parity"]["images"].endswith(f"val images from {art_shards}") and report["weights"] == "ema"
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    saved = json.loads((run / "final" / "denoiser.json").read_text())
    assert read_metadata(session)["scheduler"]["beta_schedule"] == saved["scheduler"]["beta_schedule"]
    kw = dict(count=2, steps=4, seed=3, batch_size=5, device="cpu")
    sample_images(tmp_path / "m.onnx", tmp_path / "onnx", **kw)
    sample_images(run, tmp_path / "torch", **kw)
    names = sorted(p.relative_to(tmp_path / "onnx") for p in (tmp_path / "onnx").rglob("*.png"))
    assert len(names) == 2 * len(saved["classes"])
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("onnx", "torch"))
        assert np.abs(a - b).max() <= 2, name

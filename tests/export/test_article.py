"""Export: real torch.onnx exports read back by real onnxruntime sessions, compared with PyTorch.
Models here have random weights and random BatchNorm statistics (no training, no VGG at all)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from artscale import __version__
from artscale.contracts.onnx import cuda_devices, describe_onnx
from artscale.core.errors import UserError
from artscale.export.article import IMAGE_FP16_TOLERANCE as FP16_TOLERANCE
from artscale.export.article import IMAGE_FP32_TOLERANCE as FP32_TOLERANCE
from artscale.export.article import export_onnx
from artscale.export.skeleton import provider_tolerance

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory, random_model, make_run_dir):
    root = tmp_path_factory.mktemp("export")
    model = random_model(1)
    run = make_run_dir(root / "run", size=16, step=7, model=model)
    report = export_onnx(run, root / "model.onnx")
    return model, run, root / "model.onnx", report


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("hw", [(16, 16), (24, 40)])
def test_onnx_matches_pytorch_for_any_batch_and_size(exported, n, hw, onnx_run, torch_uint8):
    model, _, path, report = exported
    assert report["parity"]["max_float_diff"] <= 1e-4 and report["parity"]["max_uint8_diff"] <= 1
    images = np.random.default_rng(n).integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    got = onnx_run(path, images)
    want = torch_uint8(model, images)
    assert got.dtype == np.uint8 and got.shape == (n, *hw, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert got.std() > 5  # a real image came out, not a constant


def test_graph_signature_metadata_and_info(exported):
    _, run, path, _ = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["generated"]
    meta = {p.key: p.value for p in proto.metadata_props}
    weights = run / "final" / "model.safetensors"
    assert meta["artscale_version"] == __version__ and meta["step"] == "7" and meta["image_size"] == "16"
    assert meta["source_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads(meta["config"])["image_size"] == 16
    checked = json.loads(meta["parity"])
    assert checked["images"] == "8 generated images"
    # which providers the gate ran on: the CPU's always (its figures are the top-level ones), CUDA's where it runs
    cpu = checked["providers"]["CPUExecutionProvider"]
    assert cpu == {"max_float_diff": checked["max_float_diff"], "max_uint8_diff": checked["max_uint8_diff"]} | {
        "tolerance": list(FP32_TOLERANCE)
    }
    assert set(checked["providers"]) <= {"CPUExecutionProvider", "CUDAExecutionProvider"}
    if not cuda_devices():
        assert list(checked["providers"]) == ["CPUExecutionProvider"]
    text = describe_onnx(path)
    assert "images: uint8 [N, H, W, 3]" in text and "generated: uint8 [N, H, W, 3]" in text
    assert "step: 7" in text and f"source_sha256: {meta['source_sha256']}" in text


@pytest.mark.slow
def test_article_pth_exports_and_info_prints_it(tmp_path, random_model, run_cli, onnx_run, torch_uint8):
    model = random_model(2)
    torch.save(model.state_dict(), tmp_path / "article.pth")  # what the article's script saves
    out = tmp_path / "exports" / "article.onnx"
    result = run_cli("export", tmp_path / "article.pth", out, "--size", "24", env={"ARTSCALE_PROGRESS_S": "0.001"})
    assert result.returncode == 0, result.stderr
    assert "parity on 8 generated images" in result.stdout
    assert "export: 4/4 step (100%)" in result.stderr  # the parity gate's progress, as a batch job shows it
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    assert np.abs(onnx_run(out, images).astype(int) - torch_uint8(model, images).astype(int)).max() <= 1
    info = run_cli("info", out)
    assert info.returncode == 0 and "image_size: 24" in info.stdout and "step: \n" in info.stdout + "\n"


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_line_exit_2(tmp_path, run_cli):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 this was a checkpoint once")
    result = run_cli("export", bad, tmp_path / "m.onnx")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("artscale: error: cannot read checkpoint")
    assert list(tmp_path.iterdir()) == [bad]


def test_wrong_architecture_is_refused(tmp_path):
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a ConvDiffusionModel state dict"):
        export_onnx(tmp_path / "other.pth", tmp_path / "m.onnx", size=16)
    assert not (tmp_path / "m.onnx").exists()


def test_the_cuda_provider_is_held_to_fp16s_tolerance_in_fp32_too():
    """TF32 (the CUDA provider's default for fp32 convolutions on Ampere and newer) has fp16's mantissa."""
    assert provider_tolerance("CPUExecutionProvider", FP32_TOLERANCE, FP16_TOLERANCE, False) == FP32_TOLERANCE
    assert provider_tolerance("CPUExecutionProvider", FP32_TOLERANCE, FP16_TOLERANCE, True) == FP16_TOLERANCE
    assert provider_tolerance("CUDAExecutionProvider", FP32_TOLERANCE, FP16_TOLERANCE, False) == FP16_TOLERANCE


def test_fp16_export_is_within_its_reported_tolerance(tmp_path, random_model, make_run_dir, onnx_run, torch_uint8):
    model = random_model(3)
    report = export_onnx(make_run_dir(tmp_path / "run", model=model), tmp_path / "half.onnx", fp16=True)
    assert report["precision"] == "fp16" and report["parity"]["tolerance"] == list(FP16_TOLERANCE)
    assert 0 < report["parity"]["max_float_diff"] <= FP16_TOLERANCE[0]
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 32, 3), dtype=np.uint8)
    got = onnx_run(tmp_path / "half.onnx", images)
    assert (
        got.dtype == np.uint8
        and np.abs(got.astype(int) - torch_uint8(model, images).astype(int)).max() <= FP16_TOLERANCE[1]
    )


def test_failed_parity_gate_writes_nothing(tmp_path, random_model, make_run_dir):
    """Weights that overflow half precision: fp32 PyTorch is fine, the fp16 graph gives inf/NaN."""
    model = random_model(4)
    with torch.no_grad():
        model.enc1[0].weight.mul_(1e4)
    run = make_run_dir(tmp_path / "run", model=model)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous good export")
    with pytest.raises(UserError, match="parity gate failed"):
        export_onnx(run, out, fp16=True)
    assert out.read_bytes() == b"the previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "run"]


def test_parity_runs_on_the_val_shards(tmp_path, make_run_dir, val_shards):
    shards = val_shards(tmp_path / "shards", 16, 3)
    run = make_run_dir(tmp_path / "run", data=str(shards))
    report = export_onnx(run, tmp_path / "m.onnx")
    assert report["parity"]["images"] == f"3 val images from {shards}"
    with pytest.raises(UserError, match="no manifest.json"):
        export_onnx(run, tmp_path / "m2.onnx", shards=tmp_path / "nowhere")


def test_an_unwritable_destination_is_one_line_and_leaves_nothing(tmp_path, make_run_dir):
    import resource
    import signal
    import subprocess

    run = make_run_dir(tmp_path / "run", 16)

    def small_files():  # every file over 100 kB fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    out = tmp_path / "exports" / "m.onnx"
    proc = subprocess.run(
        [str(VENV_BIN / "artscale"), "export", str(run), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("artscale: error: cannot write")
    assert "Traceback" not in proc.stderr and list((tmp_path / "exports").iterdir()) == []

"""End to end through the real commands: pack -> train -> export -> generate, then the demo."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from artscale.train.config import load_config


@pytest.mark.slow
def test_pack_train_export_generate(tmp_path, image_folder, run_cli, tiny, classes):
    shards, onnx_path, out = tmp_path / "shards", tmp_path / "model.onnx", tmp_path / "generated"
    r = run_cli("pack", image_folder, shards, "--size", "16", "--workers", "1", "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == classes
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 40
    assert [s["path"] for s in manifest["skipped"]] == ["painting/broken.jpg"]

    r = run_cli("train", *tiny(tmp_path / "run", shards, "max_steps=3", "checkpoint_every=2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").is_file() and (run / "config.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]

    r = run_cli("export", run, onnx_path)
    assert r.returncode == 0, r.stderr
    meta = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["image_size"] == "16" and meta["step"] == "3"

    r = run_cli("generate", onnx_path, image_folder, out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 40 and report["skipped"] == 1 and report["provider"] == "CPUExecutionProvider"
    assert [s["path"] for s in report["skipped_files"]] == ["painting/broken.jpg"]
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(outputs) == 40 and "sculpture/sculpture_7.png" in outputs
    assert np.asarray(Image.open(out / "drawings" / "drawings_0.png")).shape == (16, 16, 3)

    r = run_cli("info", onnx_path)
    assert r.returncode == 0 and "image_size" in r.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end_and_says_vgg_is_random(tmp_path, run_cli):
    r = run_cli("demo", "--out", tmp_path / "demo", "--steps", "3", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "UNTRAINED VGG16" in r.stdout
    demo = tmp_path / "demo"
    manifest = json.loads((demo / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == list(("drawings", "engraving", "iconography", "painting", "sculpture"))
    assert (
        len(manifest["skipped"]) == 3
        and manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 200
    )
    report = json.loads((demo / "generated" / "report.json").read_text())
    assert report["written"] == 24 and report["skipped"] == 0
    assert (demo / "exports" / "demo.onnx").is_file() and (demo / "before-after.png").is_file()
    assert "loss" in r.stdout and "parity vs PyTorch" in r.stdout
    with Image.open(demo / "new-pieces.png") as im:  # diffusion: 5 classes x 8 new pieces of 32 px shown at 128 px
        assert im.size == (8 * 130 + 2, 5 * 130 + 2)
    with Image.open(demo / "before-after.png") as im:  # 10 inputs over their outputs, 64 px shown at 128 px
        assert im.size == (10 * 130 + 2, 2 * 130 + 2)
    assert "new pieces" in r.stdout and "diffusion" in r.stdout.split("time ")[-1]
    preset, ran = load_config("diffusion-cpu").to_dict(), json.loads((demo / "diffusion" / "config.json").read_text())
    same = ("image_size", "denoiser", "batch_size", "lr", "lr_schedule", "warmup_steps", "ema_decay", "guidance")
    assert {k: ran[k] for k in same} == {k: preset[k] for k in same}  # the demo trains the preset's recipe
    last = r.stdout.strip().splitlines()[-1]  # the report's path, last
    assert last == f"report: {demo / 'report' / 'index.html'}  (open it in a browser)"
    page = (demo / "report" / "index.html").read_text()
    assert all(s in page for s in ("run dir: run (reconstruct)", "generation output: generated", "run dir: diffusion"))
    # A rerun continues: nothing is packed, trained or generated again.
    r = run_cli("demo", "--out", demo, "--steps", "3", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((demo / "generated" / "report.json").read_text())["already_done"] == 24

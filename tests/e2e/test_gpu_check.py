"""The pure parts of bench/gpu_check.sh's helpers. The script itself runs in CI as `bench/gpu_check.sh
--cpu-smoke` (.ci/run), every section at toy size, so it is not run again here."""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
from train_step import peak_bf16_tflops, variant_overrides  # noqa: E402


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("Tesla V100-SXM2-32GB", None),  # no bf16 tensor cores: no share is claimed
    ],
)
def test_the_bf16_peak_is_the_named_devices_and_none_for_others(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_training_variants_name_the_objective_batch_and_layout():
    assert variant_overrides("article:128") == ("article-b128", 128, ["objective=reconstruct"])
    assert variant_overrides("small:64:nocl") == (
        "small-b64-nocl",
        64,
        ["objective=diffusion", "denoiser=small", "channels_last=false"],
    )


def test_periodic_weights_keep_shapes_and_spread_and_pack_small():
    torch.manual_seed(0)
    state = {"conv": torch.randn(64, 32, 3, 3) * 0.05 + 0.01, "bias": torch.randn(64), "steps": torch.tensor(3)}
    out = gpu_check.periodic_weights(state)
    conv = out["conv"].flatten()
    assert out["conv"].shape == state["conv"].shape and out["conv"].dtype == torch.float32
    assert torch.equal(conv[: -gpu_check.WEIGHT_PERIOD], conv[gpu_check.WEIGHT_PERIOD :])  # one stretch, repeated
    assert conv.std().item() == pytest.approx(0.05, rel=0.1) and conv.mean().item() == pytest.approx(0.01, abs=0.005)
    assert torch.equal(out["bias"], state["bias"]) and torch.equal(out["steps"], state["steps"])  # short: as they were
    raw = out["conv"].numpy().tobytes()
    assert len(lzma.compress(raw, preset=6)) < len(raw) / 10


def test_a_sections_status_line_says_ok_failed_or_timeout_with_the_logs_tail(tmp_path):
    log, jsonl = tmp_path / "x.log", tmp_path / "out.jsonl"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    for rc in (0, 1, 124):
        args = gpu_check.argparse.Namespace(jsonl=jsonl, section="train", rc=rc, wall=3, limit=9, log=str(log))
        gpu_check.status(args)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["status"], r["rc"]) for r in lines] == [("ok", 0), ("failed", 1), ("timeout", 124)]
    assert "log_tail" not in lines[0] and lines[1]["log_tail"].splitlines()[-1] == "line 39"

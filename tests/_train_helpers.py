"""Shards, launch lines and read-back helpers for the loader, checkpoint and training tests.

Every training run here uses vgg_weights=random: pretrained VGG cannot be downloaded in tests.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny  # noqa: F401  (re-exported for the training tests)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Uneven on purpose: 7-sample shards and a short last one, so ranks read different amounts.
SHARD_MAX_COUNT = 7


@pytest.fixture(scope="session")
def shards(image_folder, tmp_path_factory) -> Path:
    """16 px shards packed by the real `artscale.data.pack.pack`, about a quarter of them val."""
    from artscale.data.pack import pack

    out = tmp_path_factory.mktemp("shards") / "s16"
    pack(image_folder, out, size=16, val_fraction=0.25, workers=1, shard_max_count=SHARD_MAX_COUNT)
    return out


def manifest(shards_dir: Path) -> dict:
    return json.loads((shards_dir / "manifest.json").read_text())


def env() -> dict:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    }


def accelerate_cmd(nproc: int, port: int) -> list[str]:
    """The launch line that really starts `nproc` gloo CPU ranks (`--cpu` alone starts one process)."""
    return [
        str(VENV_BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(ROOT / "launch" / "train.py"),
    ]


def launch(nproc: int, overrides: list[str], port: int, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        accelerate_cmd(nproc, port) + overrides,
        env={**env(), "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def train_cli(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "artscale"), "train", *overrides], env=env(), capture_output=True, text=True, timeout=timeout
    )


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl logs `step` (the run is mid-training), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.get("step", 0) >= step and "loss" in m for m in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Metric -> [(step, value)] read back from the offline run's .wandb record log.

    wandb 0.31 ships no reader: the file is a 7-byte header, then LevelDB-log framing in 32 KiB
    blocks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last); each whole
    record is a wandb_internal_pb2.Record. History items name the metric in `nested_key`.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = payload
        elif kind in (3, 4):
            pending += payload
        if kind in (1, 4):
            records.append(pending)
        if kind == 0 and length == 0:
            break
    history: dict[str, list[tuple[int, float]]] = {}
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {"/".join(i.nested_key) or i.key: i.value_json for i in rec.history.item}
        step = int(json.loads(items.get("_step", "0")))
        for name, value in items.items():
            if not name.startswith("_"):
                try:
                    history.setdefault(name, []).append((step, float(json.loads(value))))
                except (TypeError, ValueError):
                    pass  # an image, not a number
    return history


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the shallowest events file holds the scalars; accelerate puts the hparams one in a subdir
    events = min((p.parent for p in run_dir.rglob("events.out.tfevents.*")), key=lambda p: len(p.parts))
    acc = EventAccumulator(str(events))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]

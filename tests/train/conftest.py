"""Fixtures of the training tests: real multi-rank launches and reading back what a run logged."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from artscale.train.loop import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def accelerate_cmd() -> Callable[[int, int], list[str]]:
    """The launch line that really starts `nproc` gloo CPU ranks (`--cpu` alone starts one process)."""

    def cmd(nproc: int, port: int) -> list[str]:
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

    return cmd


@pytest.fixture(scope="session")
def launch(accelerate_cmd, env) -> Callable[..., subprocess.CompletedProcess]:
    """`nproc` CPU ranks of launch/train.py with these overrides, run to the end."""

    def run(nproc: int, overrides: list[str], port: int, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            accelerate_cmd(nproc, port) + overrides,
            env={**env(), "ACCELERATE_USE_CPU": "1"},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    return run


@pytest.fixture(scope="session")
def wait_for_step(metrics) -> Callable[..., None]:
    """Until metrics.jsonl logs `step` (the run is mid-training), or fail."""

    def wait(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.get("step", 0) >= step and "loss" in m for m in metrics(run_dir)):
                return
            if proc.poll() is not None:
                raise AssertionError(f"run ended early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
        raise AssertionError(f"step {step} not reached in {timeout} s")

    return wait


@pytest.fixture(scope="session")
def wandb_history() -> Callable[[Path], dict[str, list[tuple[int, float]]]]:
    """Metric -> [(step, value)] read back from the offline run's .wandb record log.

    wandb 0.31 ships no reader: the file is a 7-byte header, then LevelDB-log framing in 32 KiB
    blocks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last); each whole
    record is a wandb_internal_pb2.Record. History items name the metric in `nested_key`.
    """

    def read(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
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

    return read


@pytest.fixture(scope="session")
def tensorboard_scalars() -> Callable[[Path, str], list[tuple[int, float]]]:
    """[(step, value)] of one tag from a run's tensorboard events."""

    def read(run_dir: Path, tag: str) -> list[tuple[int, float]]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        # the shallowest events file holds the scalars; accelerate puts the hparams one in a subdir
        events = min((p.parent for p in run_dir.rglob("events.out.tfevents.*")), key=lambda p: len(p.parts))
        acc = EventAccumulator(str(events))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    return read


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A TCP port free now on 127.0.0.1, for a 2-rank launch's rendezvous."""

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


@pytest.fixture(scope="session")
def sigterm_at(env, wait_for_step):
    """Start `artscale train`, SIGTERM it once `step` is logged; (the step it stopped at, its stderr)."""

    def stop(overrides: list[str], run: Path, step: int, **extra_env: str) -> tuple[int, str]:
        proc = subprocess.Popen(
            [str(VENV_BIN / "artscale"), "train", *overrides],
            env={**env(), **extra_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_step(run, step, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
        return int(out.split("stopped by a signal at step ")[1].split(":")[0]), err

    return stop

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
from typing import Any, NamedTuple

import numpy as np
import pytest

from artscale.data.loader import data_spec, val_loader
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


# --- the quality check: a short diffusion-cpu run judged against held-out real images ----------


def real_images(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out (val) split as uint8 [N, 16, 16, 3] and its labels."""
    images, labels = [], []
    for x, y, _, _ in val_loader(data_spec(str(shards), 16), batch_size=64, rank=0, world=1):
        images.append(x.permute(0, 2, 3, 1).numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def features(images: np.ndarray) -> np.ndarray:
    """A 4x4 thumbnail and an 8-bin histogram per channel: what tells these classes apart at a glance."""
    x = images.astype(np.float64) / 255
    n = len(x)
    thumb = x.reshape(n, 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(n, -1)
    hist = np.stack([np.histogram(x[i, ..., c], bins=8, range=(0, 1))[0] for i in range(n) for c in range(3)])
    return np.concatenate([thumb, hist.reshape(n, -1) / (16 * 16)], axis=1)


def texture(images: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels: noise is far above real images."""
    x = images.astype(np.float64)
    return float((np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()) / 2)


def spread(images: np.ndarray) -> float:
    """Mean pairwise distance within a set (0 when every image is the same)."""
    x = images.reshape(len(images), -1).astype(np.float64)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return float(d.sum() / (len(x) * (len(x) - 1)))


def judge(samples: np.ndarray, labels: np.ndarray, shards: Path) -> dict[str, list[float]]:
    """Per class: the share of its samples a nearest-centroid classifier (fitted on the real held-out images)
    puts in it, and their spread over the real images' spread (1: as varied as the real ones)."""
    real, real_labels = real_images(shards)
    f_real = features(real)
    mean, std = f_real.mean(0), f_real.std(0) + 1e-6
    classes = int(labels.max()) + 1
    centroids = np.stack([((f_real - mean) / std)[real_labels == c].mean(0) for c in range(classes)])
    guess = (((features(samples) - mean) / std)[:, None] - centroids[None]) ** 2
    right = guess.sum(-1).argmin(1) == labels
    return {
        "accuracy": [float(right[labels == c].mean()) for c in range(classes)],
        "diversity": [spread(samples[labels == c]) / spread(real[real_labels == c]) for c in range(classes)],
    }


class Quality:
    """The quality check as one fixture: `quality(model, meta, sampler, steps, guidance)` draws 16 images per
    class from fixed noise and judges them (accuracy and diversity per class, the samples and their labels)."""

    judge = staticmethod(judge)
    real_images = staticmethod(real_images)
    texture = staticmethod(texture)

    def __init__(self, shards: Path) -> None:
        self.shards = shards

    def __call__(self, model: Any, meta: dict, sampler: str, steps: int, guidance: float) -> dict[str, Any]:
        import torch

        from artscale.diffusion.noise import noise_for
        from artscale.diffusion.sampling import sample, to_uint8, torch_predict
        from artscale.diffusion.schedulers import make_sampler

        labels = torch.arange(len(meta["classes"])).repeat_interleave(16)
        x = sample(
            torch_predict(model),
            make_sampler(sampler, meta["scheduler"]),
            noise_for(1, range(len(labels)), (3, meta["image_size"], meta["image_size"])),
            labels,
            meta["null_label"],
            steps=steps,
            guidance=guidance,
        )
        samples = to_uint8(x)
        return {**judge(samples, labels.numpy(), self.shards), "samples": samples, "labels": labels.numpy()}


@pytest.fixture(scope="session")
def quality(art_shards) -> Quality:
    return Quality(art_shards)


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="session")
def child_cpu_s() -> Callable[[], float]:
    return children_cpu_s


class Teacher(NamedTuple):
    run: Path
    steps: int
    train_s: float  # wall time of its training command
    cpu_s: float  # CPU time of its training command (the machine may be shared: wall time varies more)
    preset: Any  # the diffusion-cpu TrainConfig


@pytest.fixture(scope="session")
def quality_teacher(art_shards, tmp_path_factory, train_cli, tiny) -> Teacher:
    """The diffusion-cpu preset's recipe at 16 px for its 400 steps, trained once per session: the quality
    check's model, and the teacher the distillation test distils."""
    from artscale.train.config import load_config

    preset = load_config("diffusion-cpu")
    run = tmp_path_factory.mktemp("quality") / "teacher"
    started, cpu = time.monotonic(), children_cpu_s()
    proc = train_cli(
        [
            "--config",
            "diffusion-cpu",
            *tiny(
                run,
                art_shards,
                f"batch_size={preset.batch_size}",
                f"max_steps={preset.max_steps}",
                "log_every=50",
                f"checkpoint_every={preset.max_steps}",
                f"val_every={preset.max_steps}",
            ),
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Teacher(run, preset.max_steps, time.monotonic() - started, children_cpu_s() - cpu, preset)

"""The Python side of bench/gpu_check.sh: its data, made on CPU beforehand, and the sections that are more
than one command (the preflight, `pytest -m gpu`, the DDP preemption run), each appending JSON lines.

    .venv/bin/python bench/gpu_check.py prepare DIR [--toy]     # what bench/gpu_check.sh --prepare runs
    .venv/bin/python bench/gpu_check.py unpack DIR WORK         # the model files, unpacked for a check

The prepared DIR (what the GPU check reads; --toy: the CPU smoke's, at toy size):
    shards/      128 px shards of 5 classes (the training and DDP sections)
    jpegs/       JPEGs of 300-900 px in class folders (generation)
    small.tar.xz a `small` denoiser run dir at 128 px with random weights, and its fp32 and fp16 ONNX
    prepared.json what was made, with which settings, and its size
The weights are random, but each tensor repeats one random stretch of WEIGHT_PERIOD values (with
the tensor's own mean and spread): dense kernels take as long on any values, and the four copies of
the 17 M parameters (the run's raw and EMA weights, fp32 and fp16 ONNX: 227 MB) pack into 1.5 MB.
The whole DIR is 35 MB; making it took 18 minutes on 2 busy cores (2026-12-04), nearly all of it the
parity gates of the two exports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ["drawings", "engraving", "iconography", "painting", "sculpture"]
WEIGHT_PERIOD = 1021  # values in each tensor's repeated random stretch (a prime: rows do not line up)
FULL = {
    "preset": "small",
    "size": 128,
    "source_images": 640,
    "shard_max_count": 64,
    "jpegs": 600,
    "jpeg_sides": (300, 900),
}
TOY = {
    "preset": "tiny",
    "size": 16,
    "source_images": 80,
    "shard_max_count": 10,
    "jpegs": 12,
    "jpeg_sides": (48, 160),
}


def append(jsonl: str | Path, record: dict) -> None:
    """One JSON line, flushed at once: a section killed by its timeout leaves the lines before."""
    with open(jsonl, "a") as f:
        f.write(json.dumps(record) + "\n")


def make_jpegs(root: Path, count: int, sides: tuple[int, int], seed: int, quality: int = 85) -> int:
    """`count` art-like JPEGs (gradients, blocks, grain) of sides in `sides`, in class folders; their bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        arr = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 255 + rng.normal(0, 6, (h, w, 3))
        for _ in range(4):
            x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
            arr[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 255, 3)
        path = root / CLASSES[i % len(CLASSES)] / f"art_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=quality)
        total += path.stat().st_size
    return total


def periodic_weights(state: dict, seed: int = 0) -> dict:
    """Each floating-point tensor longer than WEIGHT_PERIOD as one random stretch of that many values, repeated,
    with the tensor's mean and standard deviation; the rest (biases, norms) as they are."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() <= WEIGHT_PERIOD:
            out[name] = t.contiguous()
            continue
        stretch = torch.randn(WEIGHT_PERIOD, generator=g) * t.float().std() + t.float().mean()
        out[name] = stretch.repeat(math.ceil(t.numel() / WEIGHT_PERIOD))[: t.numel()].view(t.shape).to(t.dtype)
    return out


def make_small_run(root: Path, preset: str, size: int) -> list[Path]:
    """A diffusion run dir with periodic random weights (raw and EMA alike) and its fp32 and fp16 exports."""
    from safetensors.torch import load_file, save_file
    from sample import random_diffusion_run  # bench/sample.py

    from artscale.export.article import export_onnx

    run = random_diffusion_run(root / "run", preset, size, CLASSES)
    weights = periodic_weights(load_file(run / "final" / "model.safetensors"))
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(weights, str(run / "final" / name))
    export_onnx(run, root / "fp32.onnx")
    export_onnx(run, root / "fp16.onnx", fp16=True)
    return [run, root / "fp32.onnx", root / "fp16.onnx"]


def prepare(out: Path, toy: bool) -> dict:
    """Everything the check's sections read, made on this CPU; returns prepared.json's content."""
    from artscale.data.pack import pack

    spec = TOY if toy else FULL
    started = time.perf_counter()
    if out.is_dir() and any(out.iterdir()) and not (out / "prepared.json").is_file():
        raise SystemExit(f"{out} holds other files: give a new folder, or one an earlier --prepare made")
    shutil.rmtree(out, ignore_errors=True)  # an earlier --prepare's data: made again
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        lo = max(spec["size"] + spec["size"] // 4, 40)
        make_jpegs(Path(tmp) / "src", spec["source_images"], (lo, 2 * lo), seed=1, quality=92)
        pack(
            Path(tmp) / "src",
            out / "shards",
            size=spec["size"],
            val_fraction=0.05,
            workers=0,
            shard_max_count=spec["shard_max_count"],
        )
        make_jpegs(out / "jpegs", spec["jpegs"], spec["jpeg_sides"], seed=2)
        files = make_small_run(Path(tmp) / "small", spec["preset"], spec["size"])
        with tarfile.open(out / "small.tar.xz", "w:xz", preset=6) as tar:
            for path in files:
                tar.add(path, arcname=f"small/{path.name}")
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    info = {
        "toy": toy,
        "preset": spec["preset"],
        "image_size": spec["size"],
        "classes": CLASSES,
        "train_images": manifest.get("splits", {}).get("train", {}).get("count", spec["source_images"]),
        "jpegs": spec["jpegs"],
        "jpeg_sides": list(spec["jpeg_sides"]),
        "weight_period": WEIGHT_PERIOD,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    info["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def unpack(data: Path, work: Path) -> Path:
    """small.tar.xz into WORK/small (run/, fp32.onnx, fp16.onnx); returns that folder."""
    shutil.rmtree(work / "small", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(data / "small.tar.xz") as tar:
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(work, **extra)
    return work / "small"


def start(jsonl: str, mode: str, data: Path) -> None:
    """The first line of a check: when, where, which commit and which data (OUT may hold several runs)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    record = {
        "section": "start",
        "mode": mode,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "commit": commit.stdout.strip() or None,
        "python": sys.version.split()[0],
        "data": str(data),
        "prepared": json.loads((data / "prepared.json").read_text()),
    }
    append(jsonl, record)


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def status(args: argparse.Namespace) -> int:
    """The line bench/gpu_check.sh writes after each section: ok, failed or timeout, and the log's tail."""
    rc = args.rc
    state = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
    record = {"section": args.section, "status": state, "rc": rc, "wall_s": args.wall, "limit_s": args.limit}
    if state != "ok":
        record["log_tail"] = tail(Path(args.log))
    append(args.jsonl, record)
    return 0


def doctor(jsonl: str, smoke: bool) -> int:
    """`artscale doctor --need cuda --json`: its exit code and report; it must exit 0 on the GPU host. The smoke
    also runs the plain `doctor --json`, which must exit 0, and accepts 0 or 2 from `--need cuda`."""
    exe = str(Path(sys.executable).parent / "artscale")
    ok = True
    for need in ([], ["--need", "cuda"]) if smoke else (["--need", "cuda"],):
        proc = subprocess.run([exe, "doctor", *need, "--json"], capture_output=True, text=True, timeout=120)
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            report = None
        expected = (0, 2) if smoke and need else (0,)
        ok = ok and proc.returncode in expected and report is not None
        record = {
            "section": "doctor",
            "args": " ".join([*need, "--json"]),
            "rc": proc.returncode,
            "expected_rc": expected,
        }
        record.update({"report": report} if report is not None else {"stdout": proc.stdout[-2000:]})
        append(jsonl, {**record, "stderr": proc.stderr[-1000:]} if proc.returncode not in (0, 2) else record)
        sys.stderr.write(proc.stderr)
    return 0 if ok else 1


def pytest_gpu(jsonl: str, work: Path, smoke: bool) -> int:
    """`pytest -m gpu` and its counts. Fails on any failed test, or on a GPU host where none passed."""
    work.mkdir(parents=True, exist_ok=True)
    xml = work / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    proc = subprocess.run(cmd, cwd=ROOT, timeout=3600)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skips = [], {}
    if xml.is_file():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            skip = case.find("skipped")
            if skip is not None:
                reason = skip.get("message", "")
                skips[reason] = skips.get(reason, 0) + 1
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    record = {
        "section": "pytest_gpu",
        "rc": proc.returncode,
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failed_tests": failed,
        "skip_reasons": skips,
    }
    append(jsonl, record)
    broken = proc.returncode not in (0, 5) or failed or counts["errors"]
    return 1 if broken or (not smoke and passed == 0) else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_of(pid: int) -> list[int]:
    """The launcher's child processes (torchrun's ranks)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()] if path.is_file() else []
    return max(steps, default=0)


def ddp(data: Path, work: Path, jsonl: str, cpu: bool, batch: int, signal_at: int) -> int:
    """One DDP rank (NCCL on a GPU, gloo on CPU) under torchrun; USR1 once step `signal_at` is logged: the rank
    checkpoints and exits 75; the same command resumes from that step and runs 5 more.

    torchrun, not `accelerate launch --multi_gpu --num_processes 1`, which accelerate refuses ("at least 2
    processes"): accelerate's own multi-GPU launcher is torchrun, and artscale trains under it the same."""
    info = json.loads((data / "prepared.json").read_text())
    run = work / "ddp"
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "NCCL_DEBUG": "INFO"}
    env.update({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if cpu else {})
    precision = "no" if cpu else "bf16"

    def command(max_steps: int) -> list[str]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1"]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        keys = [f"data={data / 'shards'}", f"run_dir={run}", f"image_size={info['image_size']}"]
        keys += [f"batch_size={batch}", f"max_steps={max_steps}", f"mixed_precision={precision}"]
        keys += ["vgg_weights=random", "tracker=none", "log_every=1", "pg_timeout_s=120"]
        keys += ["val_every=1000000", "sample_every=1000000", "checkpoint_every=1000000"]
        return [*launcher, str(ROOT / "launch" / "train.py"), *keys]

    record: dict = {"section": "ddp", "backend": "gloo" if cpu else "nccl", "precision": precision, "batch": batch}
    started = time.perf_counter()
    proc = subprocess.Popen(
        command(100000), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        while logged_step(run) < signal_at and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:
            _, err = proc.communicate()
            append(jsonl, {**record, "error": f"the run ended before step {signal_at}", "stderr": err[-2000:]})
            return 1
        record["signalled_after_step"] = logged_step(run)
        record["start_to_signal_s"] = round(time.perf_counter() - started, 2)
        ranks = ranks_of(proc.pid)
        signalled = time.perf_counter()
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the launcher and its ranks
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    sys.stderr.write(err)
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    stopped = int(checkpoints[-1].name[5:]) if checkpoints else 0
    record.update(
        ranks=len(ranks),
        launcher_rc=proc.returncode,
        rank_exit_75="exitcode  : 75" in err,
        stopped_at_step=stopped,
        signal_to_exit_s=round(time.perf_counter() - signalled, 2),
        nccl_seen="NCCL INFO" in err,
    )
    if not stopped or not record["rank_exit_75"] or len(ranks) != 1:
        append(jsonl, {**record, "error": "one rank expected to checkpoint and exit 75", "stderr": err[-2000:]})
        return 1
    started = time.perf_counter()
    again = subprocess.run(command(stopped + 5), env=env, capture_output=True, text=True, timeout=300)
    sys.stderr.write(again.stderr)
    resumed = f"resumed from step {stopped} ({checkpoints[-1]})" in again.stdout
    record.update(
        resume_rc=again.returncode,
        resumed_from_step=stopped if resumed else None,
        finished=f"finished at step {stopped + 5}" in again.stdout,
        resume_s=round(time.perf_counter() - started, 2),
    )
    ok = again.returncode == 0 and resumed and record["finished"] and stopped > signal_at
    append(jsonl, record if ok else {**record, "error": "resume", "stdout": again.stdout[-1500:]})
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("prepare", help="make the check's data on this CPU")
    c.add_argument("dir", type=Path)
    c.add_argument("--toy", action="store_true", help="toy size, for the CPU smoke")
    c = sub.add_parser("unpack", help="small.tar.xz of a prepared DIR into WORK/small")
    c.add_argument("dir", type=Path)
    c.add_argument("work", type=Path)
    c = sub.add_parser("start", help="the check's first line")
    c.add_argument("--jsonl", required=True)
    c.add_argument("--mode", required=True)
    c.add_argument("--data", type=Path, required=True)
    c = sub.add_parser("status", help="a section's status line")
    c.add_argument("--jsonl", required=True)
    c.add_argument("--section", required=True)
    c.add_argument("--rc", type=int, required=True)
    c.add_argument("--wall", type=int, required=True)
    c.add_argument("--limit", type=int, required=True)
    c.add_argument("--log", default="")
    for name in ("doctor", "pytest-gpu", "ddp"):
        c = sub.add_parser(name)
        c.add_argument("--jsonl", required=True)
        c.add_argument("--smoke", action="store_true", help="on CPU, at toy size")
        if name != "doctor":
            c.add_argument("--work", type=Path, required=True)
        if name == "ddp":
            c.add_argument("--data", type=Path, required=True)
            c.add_argument("--batch-size", type=int, default=32)
            c.add_argument("--signal-at", type=int, default=10, help="the step after which USR1 is sent")
    args = p.parse_args()
    if args.cmd == "prepare":
        info = prepare(args.dir, args.toy)
        print(json.dumps(info))
        return 0
    if args.cmd == "unpack":
        print(unpack(args.dir, args.work))
        return 0
    if args.cmd == "start":
        start(args.jsonl, args.mode, args.data)
        return 0
    if args.cmd == "status":
        return status(args)
    if args.cmd == "doctor":
        return doctor(args.jsonl, args.smoke)
    if args.cmd == "pytest-gpu":
        return pytest_gpu(args.jsonl, args.work, args.smoke)
    return ddp(args.data, args.work, args.jsonl, args.smoke, args.batch_size, args.signal_at)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: training img/s from shards on a loopback S3 server against the same shards on disk.

The article's model at 128 px (model + VGG16[:16] loss, random VGG weights: same compute, no download),
`artscale train` as users run it, batch 32, one loader worker. The shards: bench/pack.py's art-like
JPEGs packed once to a folder and once to `s3://bench/shards` on moto's S3 server (`moto_server`, its
own process, as a store is), 32 samples a shard, so a step reads a new shard. The train stream is the
same in both (same seed): the runs differ only in where each shard is fetched from. Runs alternate
local, S3, local, S3 (a shared machine's speed drifts); each figure is the batch over the median step
time after --warmup steps, from metrics.jsonl (log_every=1: a step's time includes its data wait).
Also the training loader alone (one worker, no model) from each source: its img/s is the ceiling the
data puts on training. Prints one JSON line.
Measured 2026-12-07 on an AMD EPYC (AVX2 only), 2 threads shared with other jobs, fp32: training
0.64 img/s from disk, 0.83 from loopback S3 (the machine's drift; a step waited 0.021 s vs 0.016 s for
its batch, against 30+ s of compute); the loader alone 579 img/s from disk, 249 from loopback S3.
Run: .venv/bin/python bench/remote.py [--images 320] [--steps 8] [--warmup 2] [--rounds 2] [--loader-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pack import make_collection  # noqa: E402  the same art-like JPEGs (300-2400 px) as bench/pack.py

from artscale.data.pack import pack  # noqa: E402

BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def train_img_s(data: str, run_dir: Path, steps: int, warmup: int, batch: int) -> tuple[float, float]:
    """(img/s over the median step, median data wait in s) of `artscale train` on `data`."""
    cmd = [
        str(BIN / "artscale"),
        "train",
        f"data={data}",
        f"run_dir={run_dir}",
        "image_size=128",
        f"batch_size={batch}",
        f"max_steps={steps + warmup}",
        "vgg_weights=random",
        "tracker=none",
        "num_workers=1",
        "log_every=1",
        "val_every=100000",
        "sample_every=100000",
        "checkpoint_every=100000",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [m for m in logged if "loss" in m][warmup:]
    step_s = statistics.median(batch / m["img_per_s"] for m in steps_logged)
    return batch / step_s, statistics.median(m["data_wait_s"] for m in steps_logged)


def loader_img_s(data: str, batches: int, batch: int) -> float:
    """img/s of the training loader alone (one worker, as in the runs), steady state after its first batch."""
    from artscale.data.loader import data_spec, train_loader

    loader = train_loader(
        data_spec(data, 128), batch_size=batch, epoch_batches=batches + 1, seed=0, rank=0, num_workers=1
    )
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = sum(len(images) for images, _, _, _ in itertools.islice(it, batches))
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="local, S3 pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--loader-batches", type=int, default=24, help="batches of the loader-alone figure")
    p.add_argument("--loader-only", action="store_true", help="skip the training runs (minutes each on a CPU)")
    args = p.parse_args()
    server, endpoint = start_s3()
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            make_collection(tmp / "src", args.images)
            opts = {"size": 128, "workers": 2, "shard_max_count": 32}
            pack(tmp / "src", tmp / "shards", **opts)
            pack(tmp / "src", "s3://bench/shards", **opts)
            sources = (str(tmp / "shards"), "s3://bench/shards")
            loader = [[loader_img_s(d, args.loader_batches, args.batch_size) for d in sources] for _ in range(3)]
            local, remote = [], []
            for r in range(0 if args.loader_only else args.rounds):
                local.append(train_img_s(sources[0], tmp / f"local{r}", args.steps, args.warmup, args.batch_size))
                remote.append(train_img_s(sources[1], tmp / f"s3{r}", args.steps, args.warmup, args.batch_size))
    finally:
        server.terminate()
        server.wait()
    figures = {
        "bench": "remote",
        "model": "article",
        "size": 128,
        "batch": args.batch_size,
        "loader_img_s_local": round(statistics.median(a for a, _ in loader), 1),
        "loader_img_s_s3": round(statistics.median(b for _, b in loader), 1),
    }
    if local:
        local_img_s, s3_img_s = (statistics.median(x for x, _ in runs) for runs in (local, remote))
        figures |= {
            "train_img_s_local": round(local_img_s, 2),
            "train_img_s_s3": round(s3_img_s, 2),
            "s3_vs_local": round(s3_img_s / local_img_s, 3),
            "data_wait_s_local": round(statistics.median(w for _, w in local), 4),
            "data_wait_s_s3": round(statistics.median(w for _, w in remote), 4),
            "runs_local": [round(x, 2) for x, _ in local],
            "runs_s3": [round(x, 2) for x, _ in remote],
        }
    figures |= {"images": args.images, "cpu": cpu_model(), "threads": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

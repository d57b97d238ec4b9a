"""Shared fixtures: a tiny config, a tiny image folder and its shards, the commands tests run, and run
dirs written by hand in the training side's format. Every training run uses random VGG weights
(pretrained ones cannot be downloaded here) and says so through vgg_weights=random.

Helpers are fixtures, never imported: a fixture that returns a function (`tiny`, `run_cli`,
`make_image`, ...) is called in the test as that function was. Fixtures only one folder uses live in
that folder's conftest.py.

The GPU is hidden from every run that does not select the `gpu` tests alone (`pytest -m gpu`):
on a GPU host the other tests would otherwise meet CUDA providers, cuDNN's non-bit-exact kernels
and CUDA generators, and pass or fail differently than on CPU.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CLASSES = ["drawings", "engraving", "iconography", "painting", "sculpture"]

# Mark sets a test can carry, with and without `gpu`: what an -m expression is tried on.
_OTHER_MARKS = ({"slow"}, {"slurm"}, {"slow", "slurm"})


def gpu_selected(markexpr: str) -> bool:
    """Whether the -m expression runs the gpu tests alone: it selects a test marked gpu and no test
    without that mark. An empty or unreadable expression selects everything: not alone."""
    if not markexpr.strip():
        return False
    from _pytest.mark.expression import Expression

    try:
        expr = Expression.compile(markexpr)
    except Exception:  # pytest reports the bad expression itself
        return False

    def selects(marks: set[str]) -> bool:
        return expr.evaluate(lambda name, **kwargs: name in marks)

    plain = [set(), *_OTHER_MARKS]
    return any(selects({"gpu"} | m) for m in plain) and not any(selects(m) for m in plain)


def pytest_configure(config) -> None:
    """Hide the GPU, before torch or onnxruntime look for one, unless this run is `-m gpu`. An empty
    CUDA_VISIBLE_DEVICES hides it from this process and its subprocesses (and asks for no GPU)."""
    if gpu_selected(config.getoption("markexpr") or ""):
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise pytest.UsageError("CUDA was initialised before tests/conftest.py could hide the GPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_runtest_setup(item) -> None:
    """A gpu test runs only in a `-m gpu` run that sees a CUDA device; anywhere else it is skipped."""
    if item.get_closest_marker("gpu") is None:
        return
    if not gpu_selected(item.config.getoption("markexpr") or ""):
        pytest.skip("the GPU is hidden from runs that mix gpu tests with others: run them alone, `pytest -m gpu`")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: torch sees no CUDA device")


@pytest.fixture(name="gpu_selected", scope="session")
def gpu_selected_fixture() -> Callable[[str], bool]:
    """The rule the hooks above apply, for the tests that check it."""
    return gpu_selected


# --- commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def env() -> Callable[[], dict]:
    """The environment of a training subprocess: offline wandb, one OMP thread, no tqdm."""

    def training_env() -> dict:
        return {
            **os.environ,
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
        }

    return training_env


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run the real `artscale` console script in a subprocess."""

    def run(
        *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [str(VENV_BIN / "artscale"), *map(str, args)],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def train_cli(env) -> Callable[..., subprocess.CompletedProcess]:
    """`artscale train OVERRIDES` in a subprocess."""

    def train(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "artscale"), "train", *overrides],
            env=env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return train


@pytest.fixture(scope="session")
def tiny() -> Callable[..., list[str]]:
    """key=value overrides for a seconds-long CPU run (random VGG weights: no download in tests);
    `extra` come last, so they win."""

    def overrides(run_dir: Path, shards_dir: Path, *extra: str) -> list[str]:
        return [
            f"data={shards_dir}",
            f"run_dir={run_dir}",
            "image_size=16",
            "batch_size=4",
            "vgg_weights=random",
            "tracker=none",
            "num_workers=0",
            "log_every=1",
            "sample_every=1000",
            "val_every=1000",
            "checkpoint_every=1000",
            "sample_steps=2",  # the grid at a run's end: what it draws is not what these runs test
            "pg_timeout_s=120",
            *extra,
        ]

    return overrides


@pytest.fixture(scope="session")
def metrics() -> Callable[[Path], list[dict]]:
    """A run dir's metrics.jsonl, one dict a line ([] before the first line)."""

    def read(run_dir: Path) -> list[dict]:
        path = run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    return read


@pytest.fixture(scope="session")
def children() -> Callable[[int], list[int]]:
    """The pids of a process's children."""

    def of(pid: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
        return found

    return of


# --- images and shards ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Path]:
    """A small structured image (gradients + blocks), so resizing and the model have something to see."""

    def make(path: Path, size: tuple[int, int], seed: int, fmt: str | None = None) -> Path:
        rng = np.random.default_rng(seed)
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 255, 3)
        arr = np.stack(
            [
                (xx * 255 // max(w - 1, 1) + base[0]) % 256,
                (yy * 255 // max(h - 1, 1) + base[1]) % 256,
                ((xx + yy) * 3 + base[2]) % 256,
            ],
            axis=-1,
        ).astype(np.uint8)
        for _ in range(3):
            x0, y0 = rng.integers(0, max(w // 2, 1)), rng.integers(0, max(h // 2, 1))
            arr[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 255, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "RGB").save(path, fmt)
        return path

    return make


@pytest.fixture(scope="session")
def classes() -> list[str]:
    """image_folder's class folders, in the order pack numbers them."""
    return list(CLASSES)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, make_image) -> Path:
    """5 classes x 8 images of mixed sizes and formats, plus one corrupt file and one junk file."""
    root = tmp_path_factory.mktemp("collection")
    rnd = random.Random(0)
    for ci, cls in enumerate(CLASSES):
        for i in range(8):
            ext = "jpg" if i % 3 else "png"
            make_image(root / cls / f"{cls}_{i}.{ext}", (rnd.randint(24, 96), rnd.randint(24, 96)), seed=ci * 100 + i)
    (root / "painting" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "drawings" / ".DS_Store").write_bytes(b"\x00\x01junk")
    return root


# Uneven on purpose: 7-sample shards and a short last one, so ranks read different amounts.
SHARD_MAX_COUNT = 7


@pytest.fixture(scope="session")
def shards(image_folder, tmp_path_factory) -> Path:
    """16 px shards of image_folder packed by the real `artscale.data.pack.pack`, about a quarter of them val."""
    from artscale.data.pack import pack

    out = tmp_path_factory.mktemp("shards") / "s16"
    pack(image_folder, out, size=16, val_fraction=0.25, workers=1, shard_max_count=SHARD_MAX_COUNT)
    return out


@pytest.fixture(scope="session")
def manifest() -> Callable[[Path], dict]:
    """A shards dir's manifest.json."""

    def read(shards_dir: Path) -> dict:
        return json.loads((shards_dir / "manifest.json").read_text())

    return read


@pytest.fixture(scope="session")
def art_shards(tmp_path_factory) -> Path:
    """5 visibly different classes x 48 images (the demo's procedural drawers), packed at 16 px."""
    from artscale.data.pack import pack
    from artscale.demo import CLASSES, DRAWERS

    root = tmp_path_factory.mktemp("art")
    rnd = random.Random(0)
    for cls in CLASSES:
        (root / "collection" / cls).mkdir(parents=True)
        for i in range(48):
            im = DRAWERS[cls](rnd, rnd.randint(48, 96), rnd.randint(48, 96)).convert("RGB")
            im.save(root / "collection" / cls / f"{i:02d}.png")
    pack(root / "collection", root / "shards", size=16, val_fraction=0.15, workers=1, shard_max_count=40)
    return root / "shards"


# --- run dirs and ONNX files, without training ------------------------------------------------


@pytest.fixture(scope="session")
def random_model() -> Callable:
    """The article's model with random weights and random running statistics, so eval-mode BatchNorm
    is not the identity."""
    import torch

    from artscale.models.article import ConvDiffusionModel

    def make(seed: int = 0) -> ConvDiffusionModel:
        torch.manual_seed(seed)
        model = ConvDiffusionModel()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def make_run_dir(random_model) -> Callable[..., Path]:
    """An article run dir saved the way training saves one (no training needed to test export)."""
    from artscale.train.checkpoint import save_final
    from artscale.train.config import TrainConfig

    def make(run_dir: Path, size: int = 16, step: int = 7, data: str = "", model=None) -> Path:
        cfg = TrainConfig(
            image_size=size, run_dir=str(run_dir), data=data or str(run_dir / "no-shards"), vgg_weights="random"
        )
        save_final((model or random_model()).state_dict(), run_dir, cfg.to_dict(), step)
        return run_dir

    return make


@pytest.fixture(scope="module")
def model16(tmp_path_factory, make_run_dir) -> Path:
    """An article model exported to ONNX at 16 px from random weights (generate's tests, the threat tests)."""
    from artscale.export.article import export_onnx

    root = tmp_path_factory.mktemp("model")
    export_onnx(make_run_dir(root / "run", size=16), root / "m16.onnx")
    return root / "m16.onnx"


DIFFUSION_CLASSES = ["cubism", "impressionism", "ukiyo-e"]


@pytest.fixture(scope="session")
def diffusion_classes() -> list[str]:
    """The classes of make_diffusion_run's run dirs unless it is given others."""
    return list(DIFFUSION_CLASSES)


@pytest.fixture(scope="session")
def make_diffusion_run() -> Callable[..., Path]:
    """A diffusion run dir written by hand in the training side's format (final/: model and EMA weights,
    denoiser.json, config.json with objective=diffusion), so export and sampling are tested without training."""
    import torch
    from safetensors.torch import save_file

    from artscale.diffusion.schedulers import train_scheduler
    from artscale.models.denoiser import build_denoiser, denoiser_shape, preset_denoiser

    def make(
        run_dir: Path,
        size: int = 16,
        step: int = 11,
        data: str = "",
        seed: int = 0,
        preset: str = "tiny",
        classes=DIFFUSION_CLASSES,
        old_structure: bool = False,
        channels: tuple[int, ...] = (),
        groups: int = 0,
    ) -> Path:
        """Random-init denoiser weights of a preset (`channels`, `groups`: narrower, as the config's overrides);
        the EMA copy is the raw weights slightly moved, so the two differ. `old_structure`: the preset as it
        was before it had attention below the middle block."""
        torch.manual_seed(seed)
        if old_structure:
            unet = build_denoiser(size, len(classes), *denoiser_shape(preset, channels, 0, groups))
        else:
            unet = preset_denoiser(preset, size, len(classes), channels, 0, groups)
        raw = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
        ema = {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v).contiguous() for k, v in raw.items()}
        sched = train_scheduler()
        config = {
            "objective": "diffusion",
            "image_size": size,
            "data": data or str(run_dir / "no-shards"),
            "denoiser": preset,
            "prediction_type": sched.config.prediction_type,
            "beta_schedule": sched.config.beta_schedule,
            "vgg_weights": "random",
        }
        denoiser = {
            "unet": dict(unet.config),
            "scheduler": dict(sched.config),
            "classes": list(classes),
            "null_label": len(classes),
            "prediction_type": sched.config.prediction_type,
            "image_size": size,
        }
        final = run_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        save_file(raw, str(final / "model.safetensors"))
        save_file(ema, str(final / "ema.safetensors"))
        for name, data_ in (
            ("denoiser.json", denoiser),
            ("config.json", config),
            ("trainer_state.json", {"step": step}),
        ):
            (final / name).write_text(json.dumps(data_, indent=2, default=list))
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
        return run_dir

    return make


@pytest.fixture(scope="session")
def torch_uint8() -> Callable:
    """The article model's output as uint8 images, written out independently of export: normalise,
    model, x255, round."""
    import torch

    from artscale.models.article import normalize

    def run(model, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            y = model(normalize(x))
        return torch.round(y * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return run


@pytest.fixture(scope="session")
def onnx_run() -> Callable:
    """An article ONNX file's output for uint8 images, on onnxruntime's CPU provider."""
    import onnxruntime as ort

    def run(path, images: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images})[0]

    return run


# --- object storage and HTTP on the loopback --------------------------------------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "artscale-test-key", "AWS_SECRET_ACCESS_KEY": "artscale-test-secret-0123"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (what s3fs's own CI runs) for the whole session: its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> SimpleNamespace:
    """The S3 server emptied (POST /moto-api/reset) with one bucket, `artscale`; its credentials and
    endpoint set in this process's environment, which subprocesses inherit (`.env` holds them).
    `.fs`: an s3fs client of its own to look at what artscale wrote."""
    import urllib.request

    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST"), timeout=30).read()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("artscale")
    return SimpleNamespace(endpoint=s3_server, env=env, fs=fs, url="s3://artscale")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch) -> None:
    """This process's environment (which subprocesses inherit) without AWS credentials: no AWS_* keys or
    profile, an empty HOME (no ~/.aws), no instance metadata. After `s3` where a test takes both."""
    home = tmp_path / "empty-home"
    home.mkdir()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "none"))


class _FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder. With faults on, the first GET of each .tar fails (alternately: the connection dropped
    halfway through the body, or a 503); a .tar named in `broken` fails every time; with `login` set,
    every request without that Authorization header gets a 401."""

    def log_message(self, *args) -> None:
        pass

    def _refused(self) -> bool:
        login = self.server.faults.login
        if login is None or self.headers.get("Authorization") == login:
            return False
        self.send_error(401, "login required")
        return True

    def do_HEAD(self) -> None:
        if not self._refused():
            super().do_HEAD()

    def do_GET(self) -> None:
        if self._refused():
            return
        faults = self.server.faults
        name = self.path.rsplit("/", 1)[-1]
        with faults.lock:
            first = name.endswith(".tar") and faults.on and name not in faults.seen
            faults.seen.add(name)
            drop = name in faults.broken or (first and len(faults.seen) % 2 == 1)
            busy = first and not drop
            faults.dropped += drop
            faults.unavailable += busy
        if busy:
            self.send_error(503, "busy")
        elif drop:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            super().do_GET()


@pytest.fixture
def http_server() -> Iterator[Callable[..., SimpleNamespace]]:
    """`serve(folder, faults=False, broken=(), login=None)` starts a standard-library HTTP server for `folder` on
    127.0.0.1 (port 0): `.url`, and `.dropped` / `.unavailable`, what its faults did (see _FaultyHandler)."""
    servers = []

    def serve(
        folder: Path, faults: bool = False, broken: tuple[str, ...] = (), login: str | None = None
    ) -> SimpleNamespace:
        handler = functools.partial(_FaultyHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.faults = SimpleNamespace(
            on=faults, broken=set(broken), login=login, seen=set(), dropped=0, unavailable=0
        )
        server.faults.lock = threading.Lock()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        state = server.faults
        state.url = f"http://127.0.0.1:{server.server_address[1]}"
        return state

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()

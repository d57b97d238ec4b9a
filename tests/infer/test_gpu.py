"""Inference on CUDA: the checks a lent GPU runs (`pytest -m gpu`), skipped where torch or onnxruntime
has no CUDA. What they measure is printed as `gpu-figure:` lines (`pytest -m gpu -s` shows them).

- sampling through IO binding on torch's stream, with a long torch kernel queued just before the call
  (a missing synchronisation reads unwritten inputs or returns an unwritten output), against the CPU session;
- img2img from two threads at once against one thread, and generate's and sample's whole runs against the CPU's;
- the export's parity gate on the CUDA provider, fp32 and fp16, for the article's image->image graph and the denoiser;
- GPU memory read from the driver, and what a run really holds per pixel against what the batch sizing assumes;
- the nodes onnxruntime puts on the CPU in a CUDA session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from artscale.export.article import export_onnx
from artscale.export.denoiser import DENOISER_FP16_TOLERANCE
from artscale.infer.generate import generate
from artscale.infer.img2img import Variations
from artscale.infer.sample import bound_predict, onnx_predict, open_denoiser, sample_images
from artscale.infer.session import (
    BYTES_PER_PIXEL,
    DENOISER_BYTES_PER_PIXEL_CHANNEL,
    GPU_MEMORY_USE,
    Runner,
    cpu_nodes,
    gpu_memory,
    open_session,
    placement,
)

pytestmark = pytest.mark.gpu
SIZE = 32
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module", autouse=True)
def cuda_here() -> None:
    """Asked when the tests run, not at collection: a fixture may hide the GPU from tests not marked gpu."""
    if not (torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()):
        pytest.skip("needs torch with CUDA and onnxruntime-gpu's CUDA provider")


def figure(text: str) -> None:
    print(f"gpu-figure: {text}", file=sys.stderr)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, make_run_dir, make_diffusion_run) -> dict:
    """Both graphs in fp32 and fp16, exported here: on a GPU the parity gate runs on the CUDA provider too."""
    root = tmp_path_factory.mktemp("gpu-exports")
    runs = {
        "article": make_run_dir(root / "article", size=SIZE),
        "denoiser": make_diffusion_run(root / "denoiser", SIZE),
    }
    return {
        (graph, fp16): (path, export_onnx(run, path, fp16=fp16))
        for graph, run in runs.items()
        for fp16 in (False, True)
        for path in [root / f"{graph}-{'fp16' if fp16 else 'fp32'}.onnx"]
    }


@pytest.mark.parametrize("graph", ["article", "denoiser"])
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_the_parity_gate_runs_on_the_cuda_provider(exports, graph, fp16):
    path, report = exports[(graph, fp16)]
    providers = report["parity"]["providers"]
    assert set(providers) == {"CPUExecutionProvider", "CUDAExecutionProvider"}
    written = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["parity"])
    assert written["providers"] == providers  # the file says where it was checked
    figure(f"parity {graph} {'fp16' if fp16 else 'fp32'}: {json.dumps(providers)}")
    cuda = providers["CUDAExecutionProvider"]
    diff = cuda.get("max_abs_diff", cuda.get("max_float_diff"))
    assert diff > 0 if fp16 else diff >= 0  # fp16 on the GPU really computes in half precision


def test_bound_sampling_waits_for_queued_torch_work_and_matches_the_cpu_session(exports):
    """From the default stream (a caller that knows nothing of the sampler's stream): a long kernel,
    then the write of x, then predict. Without ordering, onnxruntime would read x's zeros; without
    the event back, .cpu() would read an output not yet written. The host must not wait for the kernel."""
    path = exports[("denoiser", False)][0]
    session, used, stream = open_denoiser(path, "cuda", False)
    assert used == "CUDAExecutionProvider" and stream is not None
    predict = bound_predict(session, torch.device("cuda"), stream)
    reference = onnx_predict(ort.InferenceSession(str(path), providers=CPU))
    x_host = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([999, 800, 500, 300, 100, 0]), torch.tensor([0, 1, 2, 3, 0, 1])
    want = reference(x_host, t, labels).numpy()
    t_gpu, labels_gpu, source = t.cuda(), labels.cuda(), x_host.cuda()
    predict(source, t_gpu, labels_gpu)  # this shape's bindings and cuDNN's algorithm search, out of the timing
    x = torch.zeros_like(source)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    torch.cuda._sleep(int(1e9))  # about half a second of GPU time, queued on the default stream
    end.record()
    x.copy_(source)
    started = time.perf_counter()
    out = predict(x, t_gpu, labels_gpu)
    returned = time.perf_counter() - started
    got = out.cpu().numpy()  # on the default stream, after the run through predict's event
    queued = begin.elapsed_time(end) / 1000
    figure(f"predict returned after {returned * 1000:.1f} ms with {queued * 1000:.0f} ms of torch work queued ahead")
    assert np.abs(got - want).max() <= DENOISER_FP16_TOLERANCE  # x's zeros would be off by ~1
    assert returned < queued / 2, (
        "predict waited for the GPU: a host synchronisation in the loop (or a CPU node reading a GPU tensor)"
    )


@pytest.mark.parametrize("sampler", ["dpm++", "ddim"])
def test_sample_on_cuda_gives_the_cpus_images(exports, tmp_path, sampler):
    path = exports[("denoiser", False)][0]
    kw = dict(count=3, steps=6, sampler=sampler, guidance=3.0, seed=2, batch_size=4)
    started = time.perf_counter()
    gpu = sample_images(path, tmp_path / "gpu", device="cuda", **kw)
    figure(f"sample {sampler} on CUDA: {gpu['written']} images in {time.perf_counter() - started:.2f} s")
    cpu = sample_images(path, tmp_path / "cpu", device="cpu", **kw)
    assert gpu["provider"] == "CUDAExecutionProvider" and gpu["written"] == cpu["written"] == 9
    assert gpu["nodes_by_provider"].get("CUDAExecutionProvider", 0) > 0
    diffs = []
    for png in sorted((tmp_path / "cpu").rglob("*.png")):
        a = np.asarray(Image.open(png), dtype=int)
        b = np.asarray(Image.open(tmp_path / "gpu" / png.relative_to(tmp_path / "cpu")), dtype=int)
        diffs.append(np.abs(a - b).max())
    figure(f"sample {sampler}: CUDA vs CPU max level difference per image {diffs}")
    assert len(diffs) == 9 and max(diffs) <= 4


def test_img2img_from_two_threads_gives_one_threads_pixels(exports):
    """generate runs two batches at once on one session and one stream: neither may see the other's buffers."""
    path = exports[("denoiser", False)][0]
    session, used, stream = open_denoiser(path, "cuda", False)
    opts = dict(class_name="cubism", strength=0.6, steps=8, seed=3)
    gpu = Variations(session, device="cuda", stream=stream, **opts)
    cpu = Variations(ort.InferenceSession(str(path), providers=CPU), **opts)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)]
    entries = [[SimpleNamespace(rel=f"cubism/{b}-{i}.png") for i in range(4)] for b in range(4)]
    single = [gpu(b, e) for b, e in zip(batches, entries)]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for one, two in zip(single, pool.map(gpu, batches, entries)):
                assert np.abs(one.astype(int) - two.astype(int)).max() <= 1
    worst = max(np.abs(a.astype(int) - cpu(b, e).astype(int)).max() for a, b, e in zip(single, batches, entries))
    figure(f"img2img CUDA vs CPU: max level difference {worst}")
    assert worst <= 4


def test_generate_variations_on_cuda_reopen_on_torchs_stream_and_match_the_cpu(exports, tmp_path):
    path = exports[("denoiser", False)][0]
    rng = np.random.default_rng(1)
    for i in range(6):
        (tmp_path / "in" / "cubism").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "in" / f"cubism/{i}.png")
    variation = {"class_from_parent": True, "strength": 0.5, "steps": 6}
    gpu = generate(path, tmp_path / "in", tmp_path / "gpu", device="cuda", variation=variation)
    cpu = generate(path, tmp_path / "in", tmp_path / "cpu", device="cpu", variation=variation)
    assert gpu["provider"] == "CUDAExecutionProvider" and gpu["written"] == cpu["written"] == 6
    figure(f"generate img2img on CUDA: nodes {gpu['nodes_by_provider']}, batches {gpu['batches']}")
    for i in range(6):
        a = np.asarray(Image.open(tmp_path / "gpu" / f"cubism/{i}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "cpu" / f"cubism/{i}.png"), dtype=int)
        assert np.abs(a - b).max() <= 4


def test_gpu_memory_comes_from_the_device_and_honours_cuda_visible_devices():
    free, total = torch.cuda.mem_get_info()
    memory = gpu_memory()
    assert memory is not None and memory.total == total and abs(memory.free - free) < 1 << 30
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    code = "from artscale.infer.session import gpu_memory; print(gpu_memory().total)"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": uuid}  # nvidia-smi -i cannot take a MIG UUID; the driver can
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) == total
    figure(f"GPU memory: {memory.free / 2**30:.1f} GiB free of {memory.total / 2**30:.1f} GiB")


def test_a_cuda_run_holds_no_more_per_pixel_than_the_batch_sizing_assumes(exports):
    """What onnxruntime's arena grows by for one run, against BYTES_PER_PIXEL (the article's graph,
    --native's heuristic convolutions) and the denoiser's per-channel figure (exhaustive search)."""
    article, _ = exports[("article", False)]
    session, used = open_session(article, "cuda", False, "default", threads=1, varied_shapes=True)
    before = gpu_memory().free
    Runner(session, "cuda")(np.zeros((2, 512, 512, 3), np.uint8))
    per_pixel = (before - gpu_memory().free) / (2 * 512 * 512)
    figure(f"article graph on CUDA holds {per_pixel:.0f} B per pixel (sizing assumes {BYTES_PER_PIXEL})")
    assert per_pixel <= BYTES_PER_PIXEL / GPU_MEMORY_USE

    denoiser, _ = exports[("denoiser", False)]
    session, used, _ = open_denoiser(denoiser, "cuda", False)
    rows = 64
    before = gpu_memory().free
    feed = {
        "sample": np.random.default_rng(0).standard_normal((rows, 3, SIZE, SIZE), dtype=np.float32),
        "timestep": np.full(rows, 500, np.int64),
        "class_labels": np.zeros(rows, np.int64),
    }
    session.run(None, feed)
    per_channel = (before - gpu_memory().free) / (rows * SIZE * SIZE) / 32  # the tiny preset: 32 channels
    figure(
        f"tiny denoiser on CUDA holds {per_channel:.0f} B per pixel-row per channel "
        f"(sizing assumes {DENOISER_BYTES_PER_PIXEL_CHANNEL})"
    )
    assert per_channel <= DENOISER_BYTES_PER_PIXEL_CHANNEL / GPU_MEMORY_USE


def test_the_nodes_a_cuda_session_puts_on_the_cpu_are_few_and_no_convolution(exports, capsys):
    for graph in ("article", "denoiser"):
        path, _ = exports[(graph, False)]
        session, used = open_session(Path(path), "cuda", False, "default", threads=1)
        counts, on_cpu = placement(session), cpu_nodes(session)
        logged = [ln for ln in capsys.readouterr().err.splitlines() if "nodes run on the CPU beside" in ln]
        figure(f"{graph} on {used}: nodes {counts}; on the CPU: {sorted({op for _, op in on_cpu})}")
        assert counts.get(used, 0) > 0 and len(logged) == (1 if on_cpu else 0)
        assert not [name for name, op in on_cpu if op in ("Conv", "ConvTranspose", "Gemm", "MatMul")]

"""Generation: real onnxruntime sessions over real folders of real (and broken) image files.
The model is exported once from random weights (no training, no VGG)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from artscale.contracts.onnx import describe_onnx
from artscale.core.atomic import TMP_SUFFIX
from artscale.core.errors import UserError
from artscale.data.listing import list_inputs, output_names
from artscale.infer.generate import generate, native_size
from artscale.infer.session import (
    BYTES_PER_PIXEL,
    CPU_BATCH,
    GPU_MAX_BATCH,
    GPU_MEMORY_USE,
    GPU_STREAMS,
    MAX_BATCH_PIXELS,
    Runner,
    batch_limit,
    cpu_nodes,
    cpu_nodes_line,
    denoiser_bytes_per_pixel,
    placement,
)

VENV_BIN = Path(sys.executable).parent


def _cuda_usable() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


GOOD = {  # input -> output, for --format png
    "top.jpg": "top.png",
    "x.jpg": "x.jpg.png",
    "x.png": "x.png.png",  # side by side: each keeps its whole name
    "a/deep/er/leaf.jpeg": "a/deep/er/leaf.png",
    "a/UPPER.JPG": "a/UPPER.png",
    "a/with space & ünïcödé.png": "a/with space & ünïcödé.png",
    "a/dots.in.name.webp": "a/dots.in.name.png",
    "b/grey.png": "b/grey.png",
    "b/rgba.png": "b/rgba.png",
}
BAD = {  # input -> reason (from images.py or the listing)
    "broken.jpg": "",
    "a/empty.png": "",
    "b/text-not-image.png": "",
    "b/model.psd": "not an image file name (.psd)",
}
JUNK = [".DS_Store", "a/notes.txt", "b/Thumbs.db"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, make_image) -> Path:
    root = tmp_path_factory.mktemp("tree") / "in"
    for i, rel in enumerate(GOOD):
        make_image(root / rel, (20 + 7 * i, 40 - 2 * i), seed=i, fmt="WEBP" if rel.endswith("webp") else None)
    Image.open(root / "b/grey.png").convert("L").save(root / "b/grey.png")
    Image.open(root / "b/rgba.png").convert("RGBA").save(root / "b/rgba.png")
    (root / "broken.jpg").write_bytes((root / "top.jpg").read_bytes()[:200])
    (root / "a/empty.png").write_bytes(b"")
    (root / "b/text-not-image.png").write_text("hello")
    (root / "b/model.psd").write_bytes(b"8BPS")
    for rel in JUNK:
        (root / rel).write_bytes(b"junk")
    (root / ".hidden").mkdir()
    make_image(root / ".hidden/skipme.jpg", (16, 16), seed=99)
    return root


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_output_names_follow_the_rule():
    names = output_names(["x.jpg", "x.png", "x.jpg.jpg", "y.jpeg", "z.png", "sub.jpg"], ".png", {"sub.png"})
    assert names == {
        "x.jpg": "x.jpg.png",
        "x.png": "x.png.png",
        "x.jpg.jpg": "x.jpg.jpg.png",
        "y.jpeg": "y.png",
        "z.png": "z.png",
        "sub.jpg": "sub.jpg.png",
    }
    assert native_size((1000, 333), 512) == (512, 168) and native_size((20, 30), 1024) == (24, 32)


def test_tree_is_mirrored_and_every_input_is_accounted_for(tree, model16, tmp_path):
    out = tmp_path / "out"
    report = generate(model16, tree, out, device="cpu", workers=2, batch_size=3)
    assert _files(out) == set(GOOD.values()) | {"report.json"}
    assert json.loads((out / "report.json").read_text()) == report
    # every entry accounted for: a file in a hidden folder is ignored, and counted, as pack counts it
    assert report["inputs_seen"] == len(GOOD) + len(BAD) + len(JUNK) + 1
    assert (report["written"], report["already_done"], report["skipped"], report["ignored"]) == (
        len(GOOD),
        0,
        len(BAD),
        len(JUNK) + 1,
    )
    reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert set(reasons) == set(BAD) and reasons["b/model.psd"] == BAD["b/model.psd"]
    assert (
        reasons["broken.jpg"].startswith("truncated or corrupt")
        and reasons["a/empty.png"] == "not an image: empty file"
    )
    assert report["provider"] == "CPUExecutionProvider" and report["size"] == 16
    assert (
        list(report["nodes_by_provider"]) == ["CPUExecutionProvider"]
        and report["nodes_by_provider"]["CPUExecutionProvider"] >= 10
    )  # the model's convolutions, norms, activations and the graph's casts, all placed
    for rel in GOOD.values():
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (16, 16)
    assert not list(out.rglob(f"*{TMP_SUFFIX}"))


def test_nodes_on_the_cpu_are_named_in_one_line_for_a_gpu_session(model16):
    """A GPU session logs the nodes onnxruntime put on the CPU (once, at open): here a CPU session
    stands in, whose nodes are all on the CPU, as if the GPU provider had taken none."""
    from artscale.infer.session import open_session

    session, used = open_session(model16, "cpu", False, "default", threads=1)
    nodes, counts = cpu_nodes(session), placement(session)
    assert used == "CPUExecutionProvider" and counts == {"CPUExecutionProvider": len(nodes)} and len(nodes) >= 10
    assert {op for _, op in nodes} >= {"Conv", "ConvTranspose", "MaxPool"}
    assert cpu_nodes_line(nodes, len(nodes), used) == ""  # a CPU session has nothing to warn about
    line = cpu_nodes_line(nodes, len(nodes) + 5, "CUDAExecutionProvider")
    assert line.startswith(f"{len(nodes)} of {len(nodes) + 5} nodes run on the CPU beside CUDAExecutionProvider: ")
    assert "Conv x" in line and f"(e.g. {nodes[0][0]}, " in line
    few = [("/unet/Shape", "Shape"), ("/unet/Gather", "Gather"), ("/unet/Shape_1", "Shape")]
    assert cpu_nodes_line(few, 400, "CUDAExecutionProvider") == (
        "3 of 400 nodes run on the CPU beside CUDAExecutionProvider: Shape x2, Gather x1 "
        "(e.g. /unet/Shape, /unet/Gather, /unet/Shape_1)"
    )
    assert cpu_nodes_line([], 400, "CUDAExecutionProvider") == ""


def test_rerun_skips_finished_outputs(tree, model16, tmp_path):
    out = tmp_path / "out"
    first = generate(model16, tree, out, device="cpu")
    assert first["batches"] == -(-len(GOOD) // CPU_BATCH)  # the CPU's default batch: one per core, in cache
    (out / "top.png").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    report = generate(model16, tree, out, device="cpu")
    assert (report["written"], report["already_done"]) == (1, len(GOOD) - 1)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert (out / "top.png").is_file()


def test_shards_partition_the_files_exactly(tree, model16, tmp_path):
    whole = generate(model16, tree, tmp_path / "whole", device="cpu")
    out = tmp_path / "sharded"
    reports = [generate(model16, tree, out, num_shards=3, shard_index=i, device="cpu") for i in range(3)]
    assert _files(out) == (_files(tmp_path / "whole") - {"report.json"}) | {f"report-{i}-of-3.json" for i in range(3)}
    assert sum(r["written"] for r in reports) == whole["written"] and all(r["already_done"] == 0 for r in reports)
    assert sum(r["inputs_seen"] for r in reports) == whole["inputs_seen"]
    skipped = [s["path"] for r in reports for s in r["skipped_files"]]
    assert sorted(skipped) == sorted(s["path"] for s in whole["skipped_files"])
    assert min(r["inputs_seen"] for r in reports) > 0
    for rel in GOOD.values():
        assert (out / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes()


def test_native_size_restore_size_and_formats(tree, model16, tmp_path):
    entries = {e.rel: e for e in list_inputs(tree, ".jpg")}
    # batch 2, 1 worker: at most 5 images wait for a batch, so mixed sizes flush in small groups.
    report = generate(
        model16,
        tree,
        tmp_path / "native",
        device="cpu",
        native=True,
        max_side=24,
        image_format="jpg",
        quality=90,
        batch_size=2,
        workers=1,
    )
    assert report["written"] == len(GOOD) and report["size"] == "native" and report["batches"] >= 5
    for rel in GOOD:
        with Image.open(tree / rel) as src, Image.open(tmp_path / "native" / entries[rel].out) as im:
            assert im.format == "JPEG" and im.size == native_size(src.size, 24)
    generate(model16, tree, tmp_path / "restored", device="cpu", size=32, restore_size=True, image_format="webp")
    webp = {e.rel: e.out for e in list_inputs(tree, ".webp")}
    assert webp["x.jpg"] == "x.jpg.webp" and webp["top.jpg"] == "top.webp"
    for rel in GOOD:
        with Image.open(tree / rel) as src, Image.open(tmp_path / "restored" / webp[rel]) as im:
            assert im.format == "WEBP" and im.size == src.size


def test_io_binding_runner_gives_the_same_pixels(model16):
    """The GPU path (input copied in, output bound on the device, one binding per thread), run on
    CPU: the same pixels as session.run for every shape, with two batches in flight at once."""
    from concurrent.futures import ThreadPoolExecutor

    session = ort.InferenceSession(str(model16), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = [(3, 16, 24, 3), (1, 8, 8, 3), (3, 16, 24, 3), (2, 32, 16, 3), (4, 8, 16, 3), (3, 16, 24, 3)]
    batches = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(Runner(session, "cpu"), batches))
    for batch, result in zip(batches, results):
        assert result.shape == batch.shape and np.array_equal(Runner(session, None)(batch), result)


def test_batch_sizes_cap_cpu_only():
    """The batch policy, on CPU and on a pretend GPU with 80 or 8 GB free: --batch-size is honoured on a
    GPU (the CPU cache cap once cut 64 to 8 at 256 px); by default the two batches in flight together
    hold at most GPU_MEMORY_USE of the free memory (each a quarter of the total could exceed it, with
    onnxruntime's arena on top)."""
    gb = 1 << 30
    assert batch_limit(128, 128, on_gpu=False) == CPU_BATCH
    assert batch_limit(256, 256, on_gpu=False, requested=64) == MAX_BATCH_PIXELS // (256 * 256) == 8
    assert batch_limit(1024, 1024, on_gpu=False, requested=64) == 1
    assert batch_limit(256, 256, on_gpu=True, requested=64) == 64
    assert batch_limit(1024, 1024, on_gpu=True, requested=64) == 64
    free80, free8 = int(80 * gb * GPU_MEMORY_USE), int(8 * gb * GPU_MEMORY_USE)
    assert batch_limit(128, 128, on_gpu=True, budget=free80) == GPU_MAX_BATCH
    assert batch_limit(1024, 1024, on_gpu=True, budget=free80) == 58  # 64 GB / (2 x 560 B x 1 Mpx)
    assert batch_limit(1024, 1024, on_gpu=True, budget=free8) == 5
    assert batch_limit(4096, 4096, on_gpu=True, budget=free8) == 1
    for side in (128, 512, 1024):  # what batch_limit allows fits its budget, with both batches in flight
        n = batch_limit(side, side, on_gpu=True, budget=free8)
        assert n == 1 or GPU_STREAMS * n * BYTES_PER_PIXEL * side * side <= free8
    # A denoiser holds far more per pixel (two rows per image with guidance): the small preset (64
    # channels) at 128 px, and the base one (128) at 256 px, on a GPU with 16 GB free.
    free16 = int(16 * gb * GPU_MEMORY_USE)
    small, base = denoiser_bytes_per_pixel(64, rows_per_image=2), denoiser_bytes_per_pixel(128, rows_per_image=2)
    assert batch_limit(128, 128, on_gpu=True, budget=free16, bytes_per_pixel=small) == 34
    assert batch_limit(256, 256, on_gpu=True, budget=free16, bytes_per_pixel=base) == 4
    assert batch_limit(128, 128, on_gpu=True, budget=free80, bytes_per_pixel=small) == GPU_MAX_BATCH


def test_a_model_that_fails_to_run_is_one_line_with_onnxruntimes_words(tmp_path, make_image, run_cli):
    """The warm-up batch runs while the session opens: a model that loads but cannot run (here a
    Reshape no input fits; on a GPU, a broken cuDNN) fails there, in one line that keeps
    onnxruntime's own error text, not later in a worker thread."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "shape"], ["r"]),
            helper.make_node("Cast", ["r"], ["generated"], to=TensorProto.UINT8),
        ],
        "broken",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("generated", TensorProto.UINT8, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [7, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key="image_size", value="16")
    onnx.save(model, tmp_path / "broken.onnx")
    make_image(tmp_path / "in" / "a.jpg", (16, 16), seed=0)
    out = run_cli("generate", tmp_path / "broken.onnx", tmp_path / "in", tmp_path / "out", "--device", "cpu")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "fails on a tiny batch on CPU: onnxruntime:" in out.stderr and "Reshape" in out.stderr


def test_user_mistakes_are_refused(tree, model16, tmp_path):
    with pytest.raises(UserError, match="inside IN_DIR"):
        generate(model16, tree, tree / "out", device="cpu")
    with pytest.raises(UserError, match="batch-size and --workers must be >= 0"):
        generate(model16, tree, tmp_path / "o", batch_size=-1)
    with pytest.raises(UserError, match="shard-index 3"):
        generate(model16, tree, tmp_path / "o", num_shards=3, shard_index=3)
    (tmp_path / "fake.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load"):
        generate(tmp_path / "fake.onnx", tree, tmp_path / "o", device="cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        generate(model16, tree, tmp_path / "file", device="cpu")
    with pytest.raises(UserError, match="is not an ONNX model"):
        describe_onnx(tmp_path / "fake.onnx")
    assert not (tree / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(_cuda_usable(), reason="this machine has an NVIDIA driver: --device cuda may really run")
def test_device_cuda_without_a_gpu(tree, model16, tmp_path, run_cli):
    out = tmp_path / "out"
    strict = run_cli("generate", model16, tree, out, "--device", "cuda")
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1
    assert strict.stderr.startswith("artscale: error: --device cuda: CUDA does not run here") and not out.exists()
    # SLURM array defaults: task 2 of --array=1-2 is shard 1 of 2 and writes its own report.
    fallback = run_cli(
        "generate",
        model16,
        tree,
        out,
        "--device",
        "cuda",
        "--allow-cpu-fallback",
        env={"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1"},
    )
    assert fallback.returncode == 0, fallback.stderr
    report = json.loads((out / "report-1-of-2.json").read_text())
    assert report["provider"] == "CPUExecutionProvider" and report["written"] > 0 and report["shard_index"] == 1
    assert "running on CPU" in fallback.stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(model16, tmp_path, make_image):
    src = tmp_path / "in"
    for i in range(160):
        make_image(src / f"d{i % 4}" / f"img{i:03d}.jpg", (24 + i % 17, 32), seed=i)
    cmd = [
        str(VENV_BIN / "artscale"),
        "generate",
        str(model16),
        str(src),
        "--device",
        "cpu",
        "--size",
        "128",
        "--batch-size",
        "1",
        "--workers",
        "1",
        "--num-shards",
        "1",
        "--shard-index",
        "0",
    ]
    full = subprocess.run([*cmd[:4], str(tmp_path / "full"), *cmd[4:]], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd[:4], str(killed), *cmd[4:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(killed.rglob("*.png"))) < 20:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(killed.rglob("*.png")))
    assert 20 <= done_at_kill < 160 and not (killed / "report.json").exists()
    rerun = subprocess.run([*cmd[:4], str(killed), *cmd[4:]], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((killed / "report.json").read_text())
    assert report["already_done"] == done_at_kill and report["written"] == 160 - done_at_kill
    assert _files(killed) == _files(tmp_path / "full")
    assert not [p for p in killed.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    for rel in _files(killed) - {"report.json"}:
        assert (killed / rel).read_bytes() == (tmp_path / "full" / rel).read_bytes(), rel


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs an NVIDIA GPU and driver")
def test_cuda_runs_with_io_binding_and_matches_cpu(tree, model16, tmp_path):
    cpu = generate(model16, tree, tmp_path / "cpu", device="cpu")
    gpu = generate(model16, tree, tmp_path / "gpu", device="cuda", batch_size=4)
    assert (
        gpu["provider"] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and gpu["written"] == cpu["written"]
    )
    for rel in GOOD.values():
        a = np.asarray(Image.open(tmp_path / "cpu" / rel), dtype=int)
        b = np.asarray(Image.open(tmp_path / "gpu" / rel), dtype=int)
        assert np.abs(a - b).max() <= 1, rel


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tree, model16, tmp_path, run_cli):
    import resource

    out = tmp_path / "out"

    def small_files():  # every file over 300 bytes fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.RLIM_INFINITY))

    proc = subprocess.run(
        [str(VENV_BIN / "artscale"), "generate", str(model16), str(tree), str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("artscale: error:")]
    assert "cannot write" in line and "run again to continue" in line and "Traceback" not in proc.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    assert run_cli("generate", model16, tree, out, "--device", "cpu").returncode == 0
    assert json.loads((out / "report.json").read_text())["written"] > 0


def test_symlinks_follow_packs_rule(model16, tmp_path, make_image):
    """One rule for pack and generate: a link that leads outside IN_DIR, or to a folder, is skipped
    with its reason unless --follow-symlinks; a link inside the tree is generated."""
    src, outside = tmp_path / "in", tmp_path / "outside"
    make_image(src / "a" / "real.jpg", (16, 16), seed=1)
    make_image(outside / "elsewhere.jpg", (16, 16), seed=2)
    make_image(outside / "folder" / "inner.jpg", (16, 16), seed=3)
    (src / "a" / "link-in.jpg").symlink_to(src / "a" / "real.jpg")
    (src / "a" / "link-out.jpg").symlink_to(outside / "elsewhere.jpg")
    (src / "a" / "link-folder").symlink_to(outside / "folder")
    make_image(src / "b" / "x.jpg", (16, 16), seed=4)
    (src / "a" / "link-b").symlink_to(src / "b")
    strict = generate(model16, src, tmp_path / "strict", device="cpu")
    assert strict["written"] == 3 and not (tmp_path / "strict" / "a" / "link-out.png").exists()
    reasons = {s["path"]: s["reason"] for s in strict["skipped_files"]}
    assert reasons == {
        "a/link-out.jpg": "symlink leads outside IN_DIR (--follow-symlinks follows it)",
        "a/link-folder": "symlink leads outside IN_DIR (--follow-symlinks follows it)",
        "a/link-b": "symlink to a folder (--follow-symlinks follows it)",
    }
    (src / "a" / "link-b").unlink()  # followed, it would reach b/ twice (pack's rule: the second is a loop)
    followed = generate(model16, src, tmp_path / "followed", device="cpu", follow_symlinks=True)
    assert (followed["written"], followed["skipped"]) == (5, 0) and followed["follow_symlinks"]
    assert (tmp_path / "followed" / "a" / "link-folder" / "inner.png").is_file()


def test_a_batch_job_prints_progress_lines(model16, tree, tmp_path, run_cli):
    """stderr is a file in a batch job: plain progress lines, not a silent (or carriage-return) bar."""
    done = run_cli("generate", model16, tree, tmp_path / "out", "--device", "cpu", env={"ARTSCALE_PROGRESS_S": "0.001"})
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("generate: ")]
    assert lines and "\r" not in done.stderr
    assert lines[-1].startswith(f"generate: {len(GOOD) + 3}/{len(GOOD) + 3} img (100%)") and "img/s" in lines[-1]


def test_list_only_then_shards_read_the_listing(model16, tree, tmp_path, make_image, run_cli):
    """--list-only walks once; sharded tasks read OUT/listing.jsonl (a file added afterwards is not
    seen by them) and the merge names that file instead of missing it in silence."""
    from artscale.data.listing import LISTING, read_listing
    from artscale.infer.outputs import merge_reports

    src, out = tmp_path / "in", tmp_path / "out"
    for rel in ("a/one.jpg", "a/two.jpg", "b/c/three.jpg", ".hidden/x.jpg"):
        make_image(src / rel, (16, 16), seed=len(rel))
    listed = run_cli("generate", model16, src, out, "--list-only")
    assert listed.returncode == 0 and "listed 4 files (3 to generate)" in listed.stdout, listed.stderr
    assert read_listing(out, src, ".png", False).entries == list_inputs(src, ".png")
    make_image(src / "b" / "c" / "late.jpg", (16, 16), seed=9)
    make_image(src / "new" / "later.jpg", (16, 16), seed=10)
    reports = [generate(model16, src, out, device="cpu", num_shards=2, shard_index=i) for i in range(2)]
    assert sum(r["inputs_seen"] for r in reports) == 4 and sum(r["written"] for r in reports) == 3
    assert not (out / "b" / "c" / "late.png").exists()
    merged = merge_reports(out, 2)
    assert merged["written"] == 3 and merged["ignored"] == 1
    assert merged["after_listing"] == 2 and merged["after_listing_files"] == ["b/c/late.jpg", "new/later.jpg"]
    with pytest.raises(UserError, match="was made with ext '.png' \\(this run: '.jpg'\\)"):
        generate(model16, src, out, device="cpu", num_shards=2, shard_index=0, image_format="jpg")
    (out / LISTING).write_text('{"artscale_listing": 1, "files": 3}\n["a"]\n')
    with pytest.raises(UserError, match="not a whole artscale listing"):
        generate(model16, src, out, device="cpu", num_shards=2, shard_index=0)
    single = generate(model16, src, tmp_path / "single", device="cpu")  # one machine walks, as before
    assert single["written"] == 5

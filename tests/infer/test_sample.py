"""`artscale sample`: real onnxruntime sessions, real files; the run dir's torch model as reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artscale.core.errors import UserError
from artscale.export.article import export_onnx
from artscale.infer.outputs import merge_reports
from artscale.infer.sample import sample_images

VENV_BIN = Path(sys.executable).parent

STEPS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory, make_diffusion_run):
    root = tmp_path_factory.mktemp("sample")
    run = make_diffusion_run(root / "run")
    export_onnx(run, root / "m.onnx")
    return run, root / "m.onnx"


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
def test_onnx_samples_match_the_torch_sampler_and_all_classes_go_in_subfolders(model, tmp_path, diffusion_classes):
    run, onnx = model
    a = sample_images(onnx, tmp_path / "onnx", count=3, steps=STEPS, seed=5, batch_size=4)
    b = sample_images(run, tmp_path / "torch", count=3, steps=STEPS, seed=5, batch_size=4)
    assert (
        a["written"] == b["written"] == 9 and a["provider"] == "CPUExecutionProvider" and b["provider"] == "torch-cpu"
    )
    images = sorted(set(files(tmp_path / "onnx")) - {"report.json"})
    assert images == [f"{c}/{i:08d}.png" for c in diffusion_classes for i in range(3)]
    diffs = [np.abs(pixels(tmp_path / "onnx" / n) - pixels(tmp_path / "torch" / n)).max() for n in images]
    assert max(diffs) <= 2
    # --class all is --class NAME per class: the same start noise for the same index.
    sample_images(onnx, tmp_path / "one", count=3, class_name="impressionism", steps=STEPS, seed=5, batch_size=4)
    assert files(tmp_path / "one")["00000002.png"] == files(tmp_path / "onnx")["impressionism/00000002.png"]
    assert pixels(tmp_path / "one" / "00000000.png").tolist() != pixels(tmp_path / "one" / "00000001.png").tolist()


@pytest.mark.slow
def test_batch_size_does_not_change_an_image_and_shards_give_one_runs_files(model, tmp_path):
    _, onnx = model
    kw = dict(count=7, class_name="cubism", steps=STEPS, seed=1)
    sample_images(onnx, tmp_path / "b1", batch_size=1, **kw)
    sample_images(onnx, tmp_path / "b5", batch_size=5, **kw)
    for i in range(7):
        name = f"{i:08d}.png"
        assert np.abs(pixels(tmp_path / "b1" / name) - pixels(tmp_path / "b5" / name)).max() <= 2
    reports = [
        sample_images(onnx, tmp_path / "shards", batch_size=2, num_shards=3, shard_index=i, **kw) for i in range(3)
    ]
    assert [r["written"] for r in reports] == [3, 2, 2]  # chunks of 2: {0,1},{6} | {2,3} | {4,5}
    one = sample_images(onnx, tmp_path / "one", batch_size=2, **kw)
    got = {k: v for k, v in files(tmp_path / "shards").items() if not k.startswith("report")}
    assert got == {k: v for k, v in files(tmp_path / "one").items() if k != "report.json"}
    again = sample_images(onnx, tmp_path / "one", batch_size=2, **kw)
    assert (one["written"], again["written"], again["already_done"]) == (7, 0, 7)
    merged = merge_reports(tmp_path / "shards", 3, sample=True)
    assert (merged["images_in_run"], merged["written"], merged["num_shards"]) == (7, 7, 3)
    (tmp_path / "shards" / "00000005.png").unlink()
    with pytest.raises(UserError, match="1 images are missing.*00000005.png"):
        merge_reports(tmp_path / "shards", 3, sample=True)
    (tmp_path / "shards" / "report-1-of-3.json").unlink()
    with pytest.raises(UserError, match="shard 1 of 3 did not finish"):
        merge_reports(tmp_path / "shards", 3, sample=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(model, tmp_path, run_cli):
    _, onnx = model
    args = ["sample", onnx, "--count", "40", "--class", "ukiyo-e", "--steps", "12", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(VENV_BIN / "artscale"), *map(str, args), tmp_path / "killed"], env=env)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "killed").glob("*.png"))) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "killed").glob("*.png")))
    assert 6 <= done_before < 40
    rerun = run_cli(*args, tmp_path / "killed")
    assert rerun.returncode == 0, rerun.stderr
    full = run_cli(*args, tmp_path / "full")
    assert full.returncode == 0, full.stderr
    got, want = files(tmp_path / "killed"), files(tmp_path / "full")
    assert {k: v for k, v in got.items() if k != "report.json"} == {k: v for k, v in want.items() if k != "report.json"}
    assert len(got) == 41 and not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]


def test_unknown_class_and_a_non_diffusion_model_are_one_line(model, tmp_path, run_cli):
    _, onnx = model
    with pytest.raises(UserError, match="cubism, impressionism, ukiyo-e"):
        sample_images(onnx, tmp_path / "x", class_name="baroque")
    result = run_cli("sample", tmp_path / "missing.onnx", tmp_path / "y")
    assert result.returncode == 2 and "not found" in result.stderr


def test_a_corrupt_or_missing_shard_report_is_one_counted_line_in_the_merge(tmp_path):
    """`python -m artscale.cluster merge OUT --num-shards 4 --sample` (the merge job) on a broken array."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report-0-of-4.json").write_text('{"shard_index": 0, "num_shards": 4, "writ')  # cut short
    (out / "report-2-of-4.json").write_text('{"shard_index": 2, "num_shards": 4, "written": 1}')
    good = dict(shard_index=3, num_shards=4, written=1, already_done=0, images_in_shard=1, count=4, batch_size=1)
    (out / "report-3-of-4.json").write_text(json.dumps({**good, "class": "all", "classes": ["a"], "format": "png"}))
    with pytest.raises(UserError, match="3 of 4 shard reports unusable: .*report-0-of-4.json is not a readable JSON"):
        merge_reports(out, 4, sample=True)
    merged = subprocess.run(
        [sys.executable, "-m", "artscale.cluster", "merge", out, "--num-shards", "4", "--sample"],
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 2 and merged.stderr.count("\n") == 1, merged.stderr
    assert "report-1-of-4.json is missing: shard 1 of 4 did not finish" in merged.stderr
    assert "report-2-of-4.json is not a sampling report (it lacks already_done, images_in_shard" in merged.stderr
    assert merged.stderr.endswith("run shards 0-2 again\n") and not (out / "report.json").exists()


def test_bound_predict_matches_session_run_and_reuses_its_output(model):
    """The IO-binding predict (the CUDA path's code, here with device "cpu") gives session.run's pixels."""
    import onnxruntime as ort
    import torch

    from artscale.contracts.onnx import read_metadata
    from artscale.diffusion.noise import noise_for
    from artscale.diffusion.sampling import sample, to_uint8
    from artscale.diffusion.schedulers import make_sampler
    from artscale.infer.sample import bound_predict, onnx_predict

    session = ort.InferenceSession(str(model[1]), providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    bound, seen = bound_predict(session, torch.device("cpu")), set()

    def watched(x, t, labels):
        out = bound(x, t, labels)
        seen.add(out.data_ptr())
        return out

    size, null = int(meta["image_size"]), int(meta["null_label"])
    noise, labels = noise_for(0, [0, 1, 2], (3, size, size)), torch.tensor([0, 1, 0])
    runs = [
        to_uint8(sample(p, make_sampler("ddim", meta["scheduler"]), noise, labels, null, steps=STEPS))
        for p in (watched, onnx_predict(session))
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len(seen) == 1  # one output buffer for all steps: no per-step allocation or copy


def test_device_cuda_without_cuda_exits_2_in_one_line(model, tmp_path, run_cli):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine may really run CUDA")
    for m in model:  # the .onnx (onnxruntime's check) and the run dir (torch's)
        done = run_cli("sample", m, tmp_path / "out", "--device", "cuda", "--count", "1")
        assert done.returncode == 2 and done.stderr.startswith("artscale: error: --device cuda:")
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cpu_streams_split_the_rows_into_small_runs_and_give_one_runs_output(model, diffusion_classes):
    """onnx_predict with 2 streams: the rows go in runs of CPU_RUN_PIXELS, in order, with the pixels of one run."""
    import onnxruntime as ort
    import torch

    from artscale.infer.sample import CPU_RUN_PIXELS, onnx_predict

    session = ort.InferenceSession(str(model[1]), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2]
    per_run = CPU_RUN_PIXELS // (size * size)
    rows = 2 * per_run + 3  # three runs, the last a short one

    class Counted:  # the real session; only counts the rows of each run
        def __init__(self) -> None:
            self.runs: list[int] = []

        def run(self, names, feed):
            self.runs.append(len(feed["sample"]))
            return session.run(names, feed)

    counted = Counted()
    x = torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(0))
    t, labels = torch.arange(rows) * 37 % 1000, torch.arange(rows) % (len(diffusion_classes) + 1)
    split = onnx_predict(counted, streams=2)(x, t, labels)
    whole = onnx_predict(session)(x, t, labels)
    assert sorted(counted.runs) == sorted([per_run, per_run, 3])
    np.testing.assert_allclose(split.numpy(), whole.numpy(), atol=1e-5)
    assert not np.array_equal(split[:per_run].numpy(), split[per_run : 2 * per_run].numpy())


def test_bound_predict_gives_each_thread_its_own_output_buffer(model):
    """generate runs two batches at once: one thread's call must not overwrite the other's result."""
    import threading

    import onnxruntime as ort
    import torch

    from artscale.infer.sample import bound_predict, onnx_predict

    session = ort.InferenceSession(str(model[1]), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2]
    predict = bound_predict(session, torch.device("cpu"))
    xs = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    t, labels = torch.tensor([100, 700]), torch.tensor([0, 1])
    first = predict(xs[0], t, labels)
    kept = first.clone()
    other = threading.Thread(target=lambda: predict(xs[1], t, labels))
    other.start()
    other.join()
    np.testing.assert_array_equal(first.numpy(), kept.numpy())  # the other thread wrote elsewhere
    np.testing.assert_allclose(first.numpy(), onnx_predict(session)(xs[0], t, labels).numpy(), atol=1e-6)


def test_a_gpu_session_without_torch_cuda_runs_the_whole_batch_at_once(model, diffusion_classes):
    """A CPU-only torch beside onnxruntime-gpu: the CUDA session gets the whole batch in one run, not
    split into the CPU's single-row runs (one per core). The real session, under the CUDA provider's name."""
    import onnxruntime as ort
    import torch

    from artscale.infer.sample import session_predict

    session = ort.InferenceSession(str(model[1]), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2]

    class Counted:
        def __init__(self) -> None:
            self.runs: list[int] = []

        def run(self, names, feed):
            self.runs.append(len(feed["sample"]))
            return session.run(names, feed)

    x = torch.randn(40, 3, size, size, generator=torch.Generator().manual_seed(0))
    t, labels = torch.arange(40) * 25, torch.arange(40) % (len(diffusion_classes) + 1)
    on_gpu, on_cpu = Counted(), Counted()
    whole = session_predict(on_gpu, "CUDAExecutionProvider", threads=4)(x, t, labels)
    split = session_predict(on_cpu, "CPUExecutionProvider", threads=4)(x, t, labels)
    assert on_gpu.runs == [40] and len(on_cpu.runs) > 1 and sum(on_cpu.runs) == 40
    np.testing.assert_allclose(whole.numpy(), split.numpy(), atol=1e-5)


def test_the_sampler_gets_host_timesteps_and_the_model_gets_them_on_the_loops_device(model):
    """diffusion.sample hands the sampler each timestep as a Python int (a CUDA timestep would index
    DDIM's CPU tables and make the host wait every step) and the model a tensor on x's device."""
    import onnxruntime as ort
    import torch

    from artscale.contracts.onnx import read_metadata
    from artscale.diffusion.noise import noise_for
    from artscale.diffusion.sampling import sample
    from artscale.diffusion.schedulers import make_sampler
    from artscale.infer.sample import onnx_predict

    session = ort.InferenceSession(str(model[1]), providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    inner, seen, given = onnx_predict(session), [], []

    def predict(x, t, labels):
        seen.append((t.device, t.dtype, t.shape[0], x.shape[0]))
        return inner(x, t, labels)

    for name in ("ddim", "dpm++"):
        sampler = make_sampler(name, meta["scheduler"])
        step = sampler.step
        sampler.step = lambda out, t, x, _step=step: given.append(t) or _step(out, t, x)
        size = int(meta["image_size"])
        noise = noise_for(0, [0, 1], (3, size, size))
        sample(predict, sampler, noise, torch.tensor([0, 2]), int(meta["null_label"]), steps=4, guidance=2.0)
    assert len(given) == 8 and all(type(t) is int for t in given) and given[:4] == given[4:]
    assert seen == [(torch.device("cpu"), torch.int64, 4, 4)] * 8


def test_bound_predict_in_runs_of_max_rows_gives_the_whole_runs_output(model, diffusion_classes):
    """bound_predict splits a batch too big for the GPU's memory into runs of max_rows (one binding
    each, into slices of one output); split_predict does the same for a predict of fresh tensors."""
    import onnxruntime as ort
    import torch

    from artscale.infer.sample import bound_predict, onnx_predict, split_predict

    session = ort.InferenceSession(str(model[1]), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2]
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(3))
    t, labels = torch.arange(8) * 120, torch.arange(8) % (len(diffusion_classes) + 1)
    want = onnx_predict(session)(x, t, labels).numpy()
    runs = bound_predict(session, torch.device("cpu"), max_rows=3)
    first = runs(x, t, labels)
    np.testing.assert_allclose(first.numpy(), want, atol=1e-5)
    again = runs(x.flip(0), t.flip(0), labels.flip(0))  # new inputs through the same bound buffers
    assert again.data_ptr() == first.data_ptr()
    np.testing.assert_allclose(again.numpy(), want[::-1], atol=1e-5)
    counted = []

    def fresh(x, t, labels):
        counted.append(len(x))
        return onnx_predict(session)(x, t, labels)

    np.testing.assert_allclose(split_predict(fresh, 3)(x, t, labels).numpy(), want, atol=1e-5)
    assert counted == [3, 3, 2]


def test_a_failed_write_stops_sampling_in_one_line_and_the_report_counts_nodes(model, tmp_path):
    """Files are written by a pool while the next chunk samples: a write that fails still stops the
    run with generate's one-line error. The report counts the nodes per provider; the memory sizing
    reads the UNet's width from either kind of model."""
    import onnxruntime as ort

    from artscale.contracts.onnx import read_metadata
    from artscale.contracts.run_dir import load_denoiser
    from artscale.infer.sample import first_channels

    run, onnx = model
    out = tmp_path / "out"
    out.mkdir()
    (out / "impressionism").write_text("a file where the class folder would go")
    with pytest.raises(UserError, match="cannot write .*impressionism/00000000.png"):
        sample_images(onnx, out, count=2, steps=1, batch_size=2, device="cpu")
    report = sample_images(onnx, tmp_path / "ok", count=2, class_name="cubism", steps=1, batch_size=2, device="cpu")
    assert report["written"] == 2 and report["nodes_by_provider"]["CPUExecutionProvider"] > 50
    meta = read_metadata(ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]))
    assert first_channels(meta) == first_channels(load_denoiser(run)[1]) == 32  # the tiny preset's

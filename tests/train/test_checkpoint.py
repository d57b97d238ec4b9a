"""The checkpoint manager with a real (1-process, CPU) Accelerator: layout, keep-last-K, resume
points, refusing a different run, a failed write, and `describe`."""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import pytest
import torch

from artscale.contracts.run_dir import describe, latest_checkpoint, list_checkpoints, load_model
from artscale.core.errors import UserError
from artscale.models.article import ConvDiffusionModel
from artscale.train.checkpoint import CheckpointManager, check_run_dir, resume_point

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def setup(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True, project_dir=str(tmp_path))
    net = ConvDiffusionModel()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    model, opt = acc.prepare(net, opt)
    yield acc, net, model, opt, tmp_path / "run"
    AcceleratorState._reset_state(True)


def one_step(model, opt):
    x = torch.rand(2, 3, 16, 16)
    model(x).mean().backward()
    opt.step()
    opt.zero_grad()


def test_keeps_exactly_the_last_k_complete_checkpoints_and_no_temporaries(setup):
    acc, net, model, opt, run = setup
    mgr = CheckpointManager(acc, run, {"lr": 1e-3}, net, every=2, keep=2)
    (run / "checkpoints" / "step-000001.tmp").mkdir(parents=True)  # a save killed half-way
    saved = [mgr.maybe_save(step, lambda: {"skipped_samples": 0}) for step in range(1, 8)]
    assert [p.name if p else None for p in saved] == [
        None,
        "step-000002",
        None,
        "step-000004",
        None,
        "step-000006",
        None,
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]
    ckpt = latest_checkpoint(run)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6
    assert json.loads((ckpt / "config.json").read_text()) == {"lr": 1e-3}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {p.name for p in ckpt.iterdir()}


def test_weights_are_saved_with_the_models_own_keys_and_load_back_exactly(setup):
    acc, net, model, opt, run = setup
    mgr = CheckpointManager(acc, run, {}, net, every=1, keep=3)
    one_step(model, opt)
    path = mgr.save(1, {})
    loaded, weights = load_model(path)  # what export uses
    assert weights.step == 1 and set(weights.state_dict) == set(ConvDiffusionModel().state_dict())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    exp_opt = opt.state_dict()["state"][0]["exp_avg"].clone()
    one_step(model, opt)
    assert not torch.equal(net.state_dict()["enc1.0.weight"], expected["enc1.0.weight"])
    assert mgr.load(path)["step"] == 1
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], exp_opt)


def test_a_failed_write_keeps_the_previous_checkpoint(setup):
    acc, net, model, opt, run = setup
    mgr = CheckpointManager(acc, run, {}, net, every=1, keep=3)
    good = mgr.save(1, {})
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    one_step(model, opt)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))  # files over 1 MB fail (EFBIG), like a full disk
    try:
        with pytest.raises(
            UserError, match=r"could not write checkpoint .*step-000002 .*File too large.*kept .*step-000001"
        ):
            mgr.save(2, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert mgr.save(2, {}).name == "step-000002"  # space is back: saving works again


def test_resume_points(tmp_path):
    run = tmp_path / "run"
    assert resume_point(run, "latest") is None and resume_point(run, "") is None
    for step in (3, 12):
        d = run / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
        (d / "model.safetensors").write_bytes(b"")
    (run / "checkpoints" / "step-000020.tmp").mkdir()
    assert resume_point(run, "latest").name == "step-000012"
    assert resume_point(run, str(run / "checkpoints" / "step-000003")).name == "step-000003"
    with pytest.raises(UserError, match="holds checkpoints up to step 12: resume=latest"):
        resume_point(run, "")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resume_point(run, str(run / "checkpoints" / "step-000020.tmp"))


def test_a_run_dir_from_another_config_is_refused_unless_forced(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.001, "batch_size": 32, "max_steps": 10}))
    check_run_dir(tmp_path, {"lr": 0.001, "batch_size": 32, "max_steps": 99}, force=False)  # more steps: fine
    with pytest.raises(UserError, match=r"another config \(batch_size=32 there, 8 now\).*force=true"):
        check_run_dir(tmp_path, {"lr": 0.001, "batch_size": 8}, force=False)
    check_run_dir(tmp_path, {"lr": 0.001, "batch_size": 8}, force=True)
    check_run_dir(tmp_path / "fresh", {"batch_size": 8}, force=False)


def test_describe_a_run_dir_a_checkpoint_and_weights(setup):
    acc, net, model, opt, run = setup
    mgr = CheckpointManager(acc, run, {"data": "shards/x", "image_size": 16}, net, every=1, keep=3)
    ckpt = mgr.save(5, {"skipped_samples": 2})
    (run / "config.json").write_text(json.dumps({"data": "shards/x", "image_size": 16}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 0.25, "lr": 1e-3, "img_per_s": 9.0})
        + "\n"
        + json.dumps({"step": 5, "val/mse": 0.1, "val/psnr": 20.0, "val/ssim": 0.5})
        + "\n"
    )
    text = describe(run)
    assert "last logged: step 5 loss 0.2500" in text and "last val: step 5 mse 0.1000 psnr 20.00 ssim 0.500" in text
    assert "checkpoints: 1 (steps 5;" in text and "image_size=16" in text and "final weights: none yet" in text
    text = describe(ckpt)
    assert "step=5" in text and "skipped_samples=2" in text and "model.safetensors" in text
    assert "step: 5" in describe(ckpt / "model.safetensors")
    with pytest.raises(UserError, match="not found"):
        describe(run / "nope")


@pytest.mark.slow
def test_a_compiled_training_run_checkpoints_exports_and_loads(
    shards, tmp_path, run_cli, onnx_run, torch_uint8, train_cli, tiny
):
    """compile=true for real (torch.compile wraps the model: its keys start with `_orig_mod.`): the
    checkpoint and final/ hold the model's own keys, `artscale export` reads the run, onnxruntime runs it."""
    import numpy as np

    run = tmp_path / "run"
    proc = train_cli(tiny(run, shards, "max_steps=1", "compile=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    final, weights = load_model(run / "final")
    assert set(weights.state_dict) == set(ConvDiffusionModel().state_dict()) and weights.step == 1
    assert set(load_model(run / "checkpoints" / "step-000001")[1].state_dict) == set(weights.state_dict)
    out = tmp_path / "m.onnx"
    result = run_cli("export", run, out, "--size", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert np.abs(onnx_run(out, images).astype(int) - torch_uint8(final, images).astype(int)).max() <= 1


def test_a_run_dir_resolves_to_its_newest_weights(tmp_path):
    """final/ normally; a checkpoint newer than final/ (the run was continued) wins over it."""
    import shutil

    from artscale.contracts.run_dir import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, load_weights
    from artscale.models.article import ConvDiffusionModel
    from artscale.train.checkpoint import save_final, write_json_atomic

    run = tmp_path / "run"
    save_final(ConvDiffusionModel().state_dict(), run, {"image_size": 16}, 10)
    ckpt = run / "checkpoints" / "step-000020"
    ckpt.mkdir(parents=True)
    shutil.copy(run / "final" / WEIGHTS_NAME, ckpt / WEIGHTS_NAME)
    write_json_atomic(ckpt / CONFIG_NAME, {"image_size": 16})
    write_json_atomic(ckpt / STATE_NAME, {"step": 20})
    assert load_weights(run).step == 20
    save_final(ConvDiffusionModel().state_dict(), run, {"image_size": 16}, 20)
    assert load_weights(run).path == run / "final" / WEIGHTS_NAME


def test_the_articles_weights_are_the_ema_where_the_run_kept_one_unless_raw_is_asked(tmp_path):
    """A run dir with ema.safetensors beside model.safetensors (as training with ema_decay > 0 leaves it)."""
    from safetensors.torch import save_file

    from artscale.contracts.run_dir import EMA_NAME, load_weights
    from artscale.train.checkpoint import save_final

    raw, ema = ConvDiffusionModel().state_dict(), ConvDiffusionModel().state_dict()
    save_final(raw, tmp_path / "with", {"image_size": 16}, 3, lambda d: save_file(ema, str(d / EMA_NAME)))
    save_final(raw, tmp_path / "without", {"image_size": 16}, 3)
    picked = load_weights(tmp_path / "with")
    assert picked.path.name == EMA_NAME and picked.step == 3 and picked.config == {"image_size": 16}
    assert all(torch.equal(picked.state_dict[k], ema[k]) for k in ema)
    assert all(torch.equal(load_weights(tmp_path / "with", "raw").state_dict[k], raw[k]) for k in raw)
    assert load_weights(tmp_path / "without").path.name == "model.safetensors"
    with pytest.raises(UserError, match="--weights raw"):
        load_weights(tmp_path / "without", "ema")
    with pytest.raises(UserError, match="not a diffusion run"):
        from artscale.contracts.run_dir import load_denoiser

        load_denoiser(tmp_path / "with")


TWO_RANKS = """
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from artscale.train.checkpoint import shared_resume_point
from artscale.train.config import load_config
from artscale.core.errors import UserError
from artscale.train.setup import accelerator, precision_for

def say(line: str) -> None:
    # One write per line: under PYTHONUNBUFFERED=1 print's text and its newline are two writes, and the
    # other rank's line can land between them.
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()


root = Path(sys.argv[1])
cfg = load_config(None, ["compile=true", "tracker=none"])
acc = accelerator(cfg, root, precision_for(cfg))
rank = acc.process_index
for case, resume in (("a", "latest"), ("a", ""), ("b", "")):
    try:
        found = shared_resume_point(acc, root / case / f"rank{rank}", resume, wait_s=5)
    except UserError as e:
        found = f"refused: {e}"
    say(f"rank {rank} {case} {resume!r}: {found}")
model, _ = acc.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
say(f"rank {rank} model: {type(model).__name__} of {type(model._orig_mod).__name__}")
"""


def fake_checkpoint(run, step: int) -> None:
    folder = run / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (folder / "model.safetensors").write_bytes(b"")


@pytest.mark.slow
def test_two_ranks_resume_from_rank_0s_checkpoint_and_compile_the_ddp_wrapped_model(
    tmp_path, accelerate_cmd, env, free_port
):
    """Two real gloo ranks, each pointed at its own run dir, as ranks on two nodes of a lagging shared
    filesystem see one run dir: rank 1 sees a newer checkpoint (a), or checkpoints rank 0 does not (b).
    Both take rank 0's choice, its refusal too; compile=true compiles the DDP-wrapped model."""

    for rank, steps in ((0, (2, 4)), (1, (2, 4, 6))):
        for step in steps:
            fake_checkpoint(tmp_path / "a" / f"rank{rank}", step)
    fake_checkpoint(tmp_path / "b" / "rank1", 2)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    cmd = [*accelerate_cmd(2, free_port())[:-1], str(script), str(tmp_path)]
    proc = subprocess.run(
        cmd, env={**env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for rank in (0, 1):
        assert f"rank {rank} a 'latest': {tmp_path / 'a' / 'rank0' / 'checkpoints' / 'step-000004'}\n" in out
        assert f"rank {rank} a '': refused: run_dir {tmp_path / 'a' / 'rank0'} holds checkpoints up to step 4" in out
        assert f"rank {rank} b '': None\n" in out
        assert f"rank {rank} model: OptimizedModule of DistributedDataParallel\n" in out
    assert f"rank 1: resume=latest finds {tmp_path / 'a' / 'rank1' / 'checkpoints' / 'step-000006'} here" in out


@pytest.mark.slow
def test_a_run_saved_with_channels_last_true_resumes_under_the_auto_default(shards, tmp_path, tiny, train_cli):
    """config.json says channels_last=true (the old default; now auto, off for the diffusion UNet): the same
    command resumes it, since the memory layout does not define a run."""
    run = tmp_path / "run"
    args = tiny(run, shards, "objective=diffusion", "batch_size=8", "checkpoint_every=2", "sample_steps=1")
    first = train_cli([*args, "max_steps=2", "channels_last=true"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "channels_last: on (true)" in first.stdout
    assert json.loads((run / "config.json").read_text())["channels_last"] is True
    again = train_cli([*args, "max_steps=3"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stdout and "channels_last: off (auto)" in again.stdout
    assert json.loads((run / "final" / "trainer_state.json").read_text())["step"] == 3

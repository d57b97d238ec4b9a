"""Training end to end in real processes: `accelerate launch` with 2 gloo CPU ranks, `artscale
train` in 1, signals, resume, trackers read back. Tiny shards (16 px), random VGG weights
(pretrained ones cannot be downloaded in tests)."""

from __future__ import annotations

import json
import math
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from artscale.core.errors import UserError
from artscale.data.loader import data_spec
from artscale.train.config import load_config
from artscale.train.loop import EXIT_PREEMPTED, Plan, StopSignals, main

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def article_lr(step: int, steps_per_epoch: int, lr: float = 1e-3, gamma: float = 0.5, step_epochs: int = 1) -> float:
    """The article's StepLR, stepped once per epoch, read at optimizer step `step`."""
    return lr * gamma ** ((step // steps_per_epoch) // step_epochs)


LR_KEYS = ["lr_step_epochs=1", "lr_gamma=0.5"]


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory, launch, tiny, free_port):
    """One 2-rank run over uneven shards: wandb, val, samples, checkpoints every 2 steps, keep 2."""
    run = tmp_path_factory.mktemp("two") / "run"
    t = time.monotonic()
    proc = launch(
        2,
        tiny(
            run,
            shards,
            "max_steps=6",
            "tracker=wandb",
            "checkpoint_every=2",
            "keep_checkpoints=2",
            "val_every=3",
            "sample_every=3",
            *LR_KEYS,
        ),
        port=free_port(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc, time.monotonic() - t


@pytest.mark.slow
def test_two_ranks_over_uneven_shards_finish_having_run_the_same_steps(two_ranks, shards, manifest):
    run, proc, _ = two_ranks
    assert "world size 2, global batch 8 (4 per process x 2 processes x grad_accum 1)" in proc.stdout
    assert "rank 0/2 finished at step 6" in proc.stdout and "rank 1/2 finished at step 6" in proc.stdout
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (run / "checkpoints" / "step-000006").iterdir()
    }
    sizes = {s["count"] for s in manifest(shards)["shards"] if s["split"] == "train"}
    assert len(sizes) > 1


@pytest.mark.slow
def test_keep_last_k_leaves_exactly_k_complete_checkpoints(two_ranks):
    run, _, _ = two_ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert (run / "final" / "model.safetensors").is_file() and (run / "config.json").is_file()


@pytest.mark.slow
def test_wandb_offline_records_hold_the_logged_values(two_ranks, wandb_history, metrics):
    run, _, _ = two_ranks
    history = wandb_history(run)
    logged = {m["step"]: m for m in metrics(run) if "loss" in m}
    assert sorted(s for s, _ in history["loss"]) == sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, value in history["loss"]:
        assert value == pytest.approx(logged[step]["loss"], rel=1e-6)
    assert {"mse", "perceptual", "lr", "grad_norm", "img_per_s", "data_wait_s", "val/psnr", "val/ssim"} <= set(history)


@pytest.mark.slow
def test_validation_covers_the_whole_val_split_once_across_ranks(two_ranks, shards, metrics, manifest):
    run, _, _ = two_ranks
    val = [m for m in metrics(run) if "val/mse" in m]
    assert [m["step"] for m in val] == [3, 6]
    for m in val:
        assert m["val/images"] == manifest(shards)["splits"]["val"]["count"]
        assert 0 < m["val/mse"] < 1 and 0 < m["val/psnr"] < 60 and -1 <= m["val/ssim"] <= 1


@pytest.mark.slow
def test_sample_grids_are_written_as_png(two_ranks):
    run, _, _ = two_ranks
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    with Image.open(run / "samples" / "step-000006.png") as im:
        assert im.size[0] == 2 * 128 + 3 * 2 and (im.size[1] - 2) % 130 == 0  # input | output, 16 px shown at 128


@pytest.mark.slow
def test_lr_by_step_is_the_articles_schedule_with_1_and_2_processes(
    two_ranks, shards, tmp_path, train_cli, tiny, manifest, tensorboard_scalars, wandb_history
):
    run2, _, _ = two_ranks
    run1 = tmp_path / "run"
    proc = train_cli(tiny(run1, shards, "batch_size=8", "max_steps=6", "tracker=tensorboard", *LR_KEYS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_epoch = manifest(shards)["splits"]["train"]["count"] // 8  # same global batch: 8 x 1 and 4 x 2
    expected = [article_lr(step - 1, per_epoch) for step in range(1, 7)]  # logged after step s: the lr it used
    assert len(set(expected)) > 1, "the schedule must drop within the run for this test to mean anything"
    one = [v for _, v in sorted(tensorboard_scalars(run1, "lr"))]
    two = [v for _, v in sorted(wandb_history(run2)["lr"])]
    assert one == pytest.approx(expected) and two == pytest.approx(expected)


def test_num_workers_minus_one_is_chosen_for_the_device(shards, tmp_path, train_cli, tiny):
    """On CPU a loader worker only takes cores from the step: -1 (the default) means 0 there."""
    proc = train_cli(tiny(tmp_path / "run", shards, "max_steps=1", "num_workers=-1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_workers"] == 0


def test_loader_workers_carry_a_run_over_several_epochs(shards, tmp_path, manifest, train_cli, tiny, metrics):
    """The GPU default (workers, the next epoch's loader started mid-epoch), run on CPU."""
    per_epoch = manifest(shards)["splits"]["train"]["count"] // 4
    steps = 3 * per_epoch + 1
    proc = train_cli(tiny(tmp_path / "run", shards, f"max_steps={steps}", "num_workers=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = metrics(tmp_path / "run")
    train_lines = [m for m in logged if "loss" in m]  # val lines carry the step too
    assert [m["step"] for m in train_lines] == list(range(1, steps + 1)) and train_lines[-1]["skipped_samples"] == 0


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(two_ranks, shards, tmp_path, train_cli, tiny, metrics):
    run = tmp_path / "run"
    shutil.copytree(two_ranks[0], run)
    proc = train_cli(tiny(run, shards, "max_steps=8", "tracker=wandb", *LR_KEYS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(run.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]  # the same W&B run, continued
    first = proc.stdout.splitlines()[:3]
    assert f"resumed from step 6 ({run / 'checkpoints' / 'step-000006'})" in first
    assert "steps 6 -> 8" in proc.stdout and "rank 0/1 finished at step 8" in proc.stdout
    assert [m["step"] for m in metrics(run) if "loss" in m][-2:] == [7, 8]


@pytest.mark.slow
@pytest.mark.parametrize("ema", [[], ["ema_decay=0.99"]], ids=["no-ema", "ema"])
def test_sigterm_then_resume_ends_with_the_weights_of_an_uninterrupted_run(
    shards, tmp_path, ema, train_cli, tiny, sigterm_at
):
    opts = ["max_steps=10", "grad_accum=2", "hflip=true", "checkpoint_every=4", *ema]
    whole = train_cli(tiny(tmp_path / "whole", shards, *opts))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    stopped, _ = sigterm_at(tiny(cut, shards, *opts), cut, 5)
    assert 5 <= stopped < 10 and (cut / "checkpoints" / f"step-{stopped:06d}").is_dir()
    again = train_cli(tiny(cut, shards, *opts))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {stopped}" in again.stdout and "finished at step 10" in again.stdout
    for name in ["model.safetensors"] + (["ema.safetensors"] if ema else []):
        a, b = load_file(tmp_path / "whole" / "final" / name), load_file(cut / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (cut / "final" / "ema.safetensors").is_file() == bool(ema)


def train_cli_cmd() -> list[str]:
    return [str(VENV_BIN / "artscale"), "train"]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_at_one_step_and_the_rerun_finishes(
    shards, tmp_path, tiny, accelerate_cmd, env, wait_for_step, children, launch, free_port
):
    run = tmp_path / "run"
    overrides = tiny(run, shards, "max_steps=200", "batch_size=2")
    proc = subprocess.Popen(
        accelerate_cmd(2, free_port()) + overrides,
        env={**env(), "ACCELERATE_USE_CPU": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run, 2, proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    time.sleep(0.5)
    subprocess.run(["kill", "-USR1", str(ranks[-1])], check=True)
    out, err = proc.communicate(timeout=120)
    # Every rank exits EXIT_PREEMPTED; the launcher reports a failed child (exit 1) with that code.
    assert proc.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in err
    ((step, ckpt),) = [(int(p.name[5:]), p) for p in (run / "checkpoints").iterdir()]
    assert 2 <= step < 200 and {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}
    again = launch(2, tiny(run, shards, f"max_steps={step + 2}", "batch_size=2"), port=free_port())
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step} ({ckpt})" in again.stdout
    assert f"rank 1/2 finished at step {step + 2}" in again.stdout


def test_a_first_sigint_asks_for_a_checkpoint_and_a_second_exits_at_once():
    """In-process: in a subprocess two quick Ctrl-C can coalesce into one, or race the exit."""
    import os

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored when training ends


@pytest.mark.slow
def test_a_corrupt_shard_mid_run_is_skipped_and_counted_in_bf16(shards, tmp_path, train_cli, tiny, metrics):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    for victim in sorted(bad.glob("train-*.tar"))[:-1]:  # all but one: headers and images torn after the first member
        data = bytearray(victim.read_bytes())
        data[1024:-1024] = b"\x5a" * (len(data) - 2048)
        victim.write_bytes(bytes(data))
    run = tmp_path / "run"
    proc = train_cli(tiny(run, bad, "max_steps=8", "mixed_precision=bf16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped corrupt data" in proc.stderr
    import json

    state = json.loads((run / "final" / "trainer_state.json").read_text())
    assert state["step"] == 8
    skipped = json.loads((run / "checkpoints" / "step-000008" / "trainer_state.json").read_text())["skipped_samples"]
    assert skipped > 0 and [m for m in metrics(run) if "loss" in m][-1]["skipped_samples"] == skipped


def test_bad_inputs_are_one_line_and_exit_2(shards, tmp_path, train_cli, tiny):
    proc = train_cli(tiny(tmp_path / "run", tmp_path / "no-shards"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "not a shards directory" in proc.stderr
    with pytest.raises(UserError, match="holds 16 px images but image_size=32"):
        main([*tiny(tmp_path / "run", shards), "image_size=32"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"batch_size": 64}')
    with pytest.raises(UserError, match="trained with another config"):
        main(tiny(tmp_path / "old", shards))
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is here")
        main([*tiny(tmp_path / "run", shards), "mixed_precision=fp16"])


def test_the_plan_counts_steps_and_lr_by_optimizer_step(shards):
    spec = data_spec(str(shards), 16)
    n = spec.train_count
    one = Plan.make(load_config(None, ["batch_size=8", "epochs=4", *LR_KEYS]), spec, world=1)
    two = Plan.make(load_config(None, ["batch_size=4", "epochs=4", *LR_KEYS]), spec, world=2)
    assert one.steps_per_epoch == two.steps_per_epoch == n // 8 and one.total_steps == 4 * (n // 8)
    assert (
        [one.lr_at(s) for s in range(20)]
        == [two.lr_at(s) for s in range(20)]
        == [article_lr(s, n // 8) for s in range(20)]
    )
    scaled = Plan.make(load_config(None, ["batch_size=4", "grad_accum=2", "scale_lr=true"]), spec, world=2)
    assert scaled.global_batch == 16 and scaled.lr == pytest.approx(4e-3)
    assert Plan.make(load_config(None, ["batch_size=4", "max_steps=7"]), spec, world=3).total_steps == 7


def test_cosine_after_a_warm_up_rises_linearly_then_falls_to_zero_at_the_last_step(shards):
    spec = data_spec(str(shards), 16)
    keys = ["lr=0.002", "lr_schedule=cosine", "warmup_steps=20", "max_steps=420"]
    plan = Plan.make(load_config(None, keys), spec, world=1)
    assert plan.lr_at(0) == pytest.approx(0.002 / 20)  # the first step already moves
    assert plan.lr_at(9) == pytest.approx(0.001)
    assert plan.lr_at(19) == plan.lr_at(20) == pytest.approx(0.002)  # the end of the warm-up: the full lr
    assert plan.lr_at(220) == pytest.approx(0.001)  # half-way through the cosine
    assert plan.lr_at(420) == 0 and 0 < plan.lr_at(419) < 1e-7
    steps = Plan.make(load_config(None, ["batch_size=8", *LR_KEYS, "warmup_steps=4"]), spec, world=1)
    per_epoch = steps.steps_per_epoch  # the warm-up scales the article's StepLR
    expected = [min(1, (s + 1) / 4) * article_lr(s, per_epoch) for s in range(12)]
    assert [steps.lr_at(s) for s in range(12)] == pytest.approx(expected)
    assert steps.lr_at(2) == pytest.approx(7.5e-4) and len(set(expected[4:])) > 1


def test_the_lambda_lr_built_at_a_resumed_step_continues_the_one_stepped_from_zero(shards):
    """What a resumed run does: the optimizer comes back holding the last lr used, the scheduler is rebuilt
    at the checkpoint's step and sets the lr of the next one, as a scheduler stepped all along would."""
    keys = ["lr=0.002", "lr_schedule=cosine", "warmup_steps=20", "max_steps=100"]
    plan = Plan.make(load_config(None, keys), data_spec(str(shards), 16), world=1)
    whole = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=plan.lr)
    schedule = plan.scheduler(whole, 0)
    used = []
    for _ in range(60):
        used.append(whole.param_groups[0]["lr"])
        whole.step()
        schedule.step()
    resumed = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=plan.lr)
    resumed.load_state_dict(whole.state_dict())  # as accelerate's load_state does
    again = plan.scheduler(resumed, 60)
    assert used == [plan.lr_at(s) for s in range(60)]
    assert resumed.param_groups[0]["lr"] == again.get_last_lr()[0] == whole.param_groups[0]["lr"] == plan.lr_at(60)
    resumed.step()
    again.step()
    schedule.step()
    assert again.get_last_lr() == schedule.get_last_lr() == [plan.lr_at(61)]


@pytest.mark.parametrize("name,processes", [("cpu", 1), ("gpu1", 1), ("gpu8", 8), ("nodes2x8", 16)])
def test_the_shipped_accelerate_configs_parse(name, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "launch" / "accelerate" / f"{name}.yaml"))
    assert cfg.num_processes == processes and cfg.mixed_precision == "no"
    assert cfg.gpu_ids in (None, "all")  # never a fixed GPU: the scheduler's CUDA_VISIBLE_DEVICES decides
    assert (cfg.main_process_ip or "MISSING").startswith("MISSING")  # no default address such as 127.0.0.1


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(shards, tmp_path, train_cli, tiny, env):
    import resource

    run = tmp_path / "run"
    first = train_cli(tiny(run, shards, "max_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()

    def small_files():  # files over 1 MB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))

    proc = subprocess.run(
        [*train_cli_cmd(), *tiny(run, shards, "max_steps=4")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=small_files,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("artscale: error:")]
    assert "could not write checkpoint" in line and "step-000004" in line and line.endswith("step-000002")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert (run / "checkpoints" / "step-000002" / "model.safetensors").read_bytes() == before


FAULTS_SCRIPT = """
import resource, sys
import torch
from artscale.train.loop import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(32 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    x = torch.ones(32 << 20)  # 128 MB, like a CPU step's largest activations
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_activation_memory_is_reused_not_faulted_in_again():
    """Without keep_freed_memory each 128 MB tensor is mmapped and faulted in anew (8 x 32768 pages)."""
    pages = 8 * (128 << 20) // 4096

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert faults("plain") > 0.9 * pages
    assert faults("keep") < 0.5 * pages  # seen 0-25% here (more under load), against 100%


@pytest.mark.slow
def test_a_stop_on_a_validation_step_saves_first_and_progress_lines_show_step_loss_lr(
    shards, tmp_path, tiny, metrics, sigterm_at
):
    """Every step validates here: the stop must checkpoint and exit without validating its step.
    stderr is a file, so training and validation print plain progress lines (every 0.01 s here)."""
    run = tmp_path / "run"
    stopped, err = sigterm_at(tiny(run, shards, "max_steps=200", "val_every=1"), run, 2, ARTSCALE_PROGRESS_S="0.01")
    assert (run / "checkpoints" / f"step-{stopped:06d}").is_dir()
    val_steps = [m["step"] for m in metrics(run) if "val/mse" in m]
    assert stopped - 1 in val_steps and stopped not in val_steps
    train_lines = [ln for ln in err.splitlines() if ln.startswith("train: ")]
    assert train_lines and all(" step (" in ln and " loss " in ln and " lr " in ln for ln in train_lines[1:])
    assert any(ln.startswith("val: ") and " img" in ln for ln in err.splitlines())


@pytest.mark.slow
def test_after_a_crash_the_resumed_run_logs_each_step_once_and_a_torn_line_is_ignored(
    shards, tmp_path, metrics, train_cli, tiny, env, wandb_history
):
    """A SIGKILL after step 4 was logged but before its checkpoint: checkpoint 2 is the newest, and
    the last metrics line is half-written. `info` reads the run; the resume logs steps 3, 4 once."""
    run = tmp_path / "run"
    first = train_cli(tiny(run, shards, "max_steps=4", "checkpoint_every=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "final")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.1')
    info = subprocess.run([*train_cli_cmd()[:1], "info", str(run)], env=env(), capture_output=True, text=True)
    assert info.returncode == 0 and "last logged: step 4" in info.stdout, info.stderr[-2000:]
    again = train_cli(tiny(run, shards, "max_steps=4", "checkpoint_every=2", "tracker=wandb"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stdout
    assert "metrics.jsonl: dropped steps 3..4 from the interrupted run, 1 unreadable line" in again.stderr
    assert "W&B keeps its values for the steps 3..4" in again.stderr
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4]
    assert [s for s, _ in wandb_history(run)["loss"]] == [3, 4]  # this run's W&B part


def count_host_syncs(monkeypatch) -> dict[str, int]:
    """Calls, made from artscale's own code, that wait for the device: .item(), .tolist(), bool/float/int
    of a tensor, a tensor made from Python values on the device's side (new_tensor), a cross-rank reduce."""
    from accelerate import Accelerator

    counts: dict[str, int] = {}

    def counting(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if "/artscale/" in sys._getframe(1).f_code.co_filename:
                counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "new_tensor"):
        counting(torch.Tensor, name)
    counting(Accelerator, "reduce")
    return counts


@pytest.mark.slow
def test_the_training_step_makes_no_host_sync_between_log_steps(shards, tmp_path, monkeypatch, tiny):
    """Runs of 3 and 9 steps that log, validate and checkpoint only at their last step make the same
    host syncs: 0 per step. Logging every step costs syncs, so the counter does see them."""
    from accelerate.state import AcceleratorState

    def syncs(steps: int, log_every: int) -> int:
        counts = count_host_syncs(monkeypatch)
        try:
            assert (
                main(tiny(tmp_path / f"run{steps}-{log_every}", shards, f"max_steps={steps}", f"log_every={log_every}"))
                == 0
            )
        finally:
            AcceleratorState._reset_state(True)
            monkeypatch.undo()
        return sum(counts.values())

    assert syncs(9, 1000) - syncs(3, 1000) == 0
    assert syncs(9, 1) - syncs(3, 1) >= 6


def test_gpus_asked_for_without_cuda_stop_with_one_line(shards, tmp_path, tiny, env):
    """A fake SLURM GPU allocation on this CPU machine: one line naming torch's CUDA and the driver."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run(
        [*train_cli_cmd(), *tiny(tmp_path / "run", shards, "max_steps=1")],
        env={**env(), "SLURM_GPUS_ON_NODE": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "GPUs were asked for (SLURM_GPUS_ON_NODE=2)" in proc.stderr and "CUDA" in proc.stderr
    assert "nvidia-smi" in proc.stderr or "driver" in proc.stderr
    assert "`artscale doctor --need cuda` names the fix" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_what_asks_for_a_gpu_and_a_world_size_that_disagrees():
    from artscale.train.setup import check_gpu, check_world, gpus_asked_for

    assert gpus_asked_for({}) == ""
    assert gpus_asked_for({"WORLD_SIZE": "8", "LOCAL_RANK": "3"}).startswith("WORLD_SIZE=8")
    assert gpus_asked_for({"CUDA_VISIBLE_DEVICES": "2"}) == "CUDA_VISIBLE_DEVICES=2"
    assert gpus_asked_for({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "1", "SLURM_GPUS_ON_NODE": "4"}) == ""
    check_gpu({"SLURM_GPUS_ON_NODE": "4"}, cuda_available=True)
    with pytest.raises(UserError, match=r"WORLD_SIZE=8 .*torch .* is built for CUDA"):
        check_gpu({"WORLD_SIZE": "8"}, cuda_available=False)
    check_world({"WORLD_SIZE": "2"}, 2)
    check_world({}, 1)
    with pytest.raises(UserError, match="started 8 processes .* group of 1"):
        check_world({"WORLD_SIZE": "8"}, 1)


def test_loader_workers_divide_the_cores_among_the_local_processes():
    from artscale.train.setup import loader_workers

    assert loader_workers(-1, "cuda", 8, cores=16) == 2  # 8 GPU ranks on a 16-core allocation
    assert loader_workers(-1, "cuda", 1, cores=16) == 4
    assert loader_workers(-1, "cuda", 8, cores=4) == 0
    assert loader_workers(-1, "cpu", 1, cores=64) == 0
    assert loader_workers(3, "cuda", 8, cores=4) == 3


def test_wandb_goes_offline_only_without_any_credentials(tmp_path):
    """A key saved by `wandb login` in ~/.netrc is wandb's own login: no forced offline mode then."""
    from artscale.train.setup import wandb_mode

    home = tmp_path / "home"
    home.mkdir()
    assert wandb_mode({"HOME": str(home)}) == "offline"
    (home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    (home / ".netrc").chmod(0o600)
    assert wandb_mode({"HOME": str(home)}) is None
    assert wandb_mode({"HOME": str(tmp_path), "WANDB_API_KEY": "k" * 40}) is None
    assert wandb_mode({"HOME": str(tmp_path), "WANDB_MODE": "disabled"}) is None  # the user's choice stands
    assert wandb_mode({"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"


def test_the_articles_config_is_fp32():
    cfg = load_config("article")
    assert cfg.mixed_precision == "no" and cfg.image_size == 128 and cfg.batch_size == 32


def test_fp16_loss_scaling_reads_nothing_back_to_the_host_per_step(monkeypatch):
    """torch's GradScaler.step reads the overflow flag with .item() before an ordinary optimizer steps (a host
    sync per step on a GPU); the fused Adam training builds for CUDA takes the flag as a tensor. Run here on
    CPU (fused Adam and GradScaler both run there) through accelerate's optimizer wrapper as training steps
    it: 3 steps, then an overflow, which must still be skipped, and the scale halved."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    from artscale.train.setup import adam

    Accelerator(cpu=True)
    item = torch.Tensor.item

    def run(device: str) -> tuple[int, torch.Tensor, float, bool]:
        calls = [0]

        def counting(self):  # Adam's own .item() on its CPU step counts are no device sync
            calls[0] += sys._getframe(1).f_code.co_filename.endswith("grad_scaler.py")
            return item(self)

        torch.manual_seed(0)
        net = torch.nn.Linear(4, 4)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        opt = AcceleratedOptimizer(adam(net.parameters(), 1e-2, torch.device(device)), False, scaler)
        for overflow in (1.0, 1.0, 1.0, math.inf):
            scaler.scale(net(torch.ones(2, 4)).pow(2).mean() * overflow).backward()
            before = net.weight.detach().clone()
            monkeypatch.setattr(torch.Tensor, "item", counting)
            opt.step()
            monkeypatch.setattr(torch.Tensor, "item", item)
            opt.zero_grad()
        return calls[0], net.weight.detach(), scaler.get_scale(), torch.equal(before, net.weight)

    try:
        fused_calls, fused, fused_scale, fused_skipped = run("cuda")
        plain_calls, plain, plain_scale, plain_skipped = run("cpu")
    finally:
        AcceleratorState._reset_state(True)
    assert (fused_calls, plain_calls) == (0, 4)
    assert fused_skipped and plain_skipped and fused_scale == plain_scale == 128.0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)

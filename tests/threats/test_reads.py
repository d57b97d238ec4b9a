"""Threat model, reading: artscale trusts its own command line and nothing it reads back.

Each test makes a hostile or damaged file (in a real run dir from a real 2-step training run, a
config, shards) and checks that artscale answers with one line naming the file and the field, exit
2, and runs nothing it was not asked to (issue 29, findings 6, 7, 8 and 12).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from artscale.core.errors import UserError
from artscale.train.config import TrainConfig, load_config


def one_line_error(proc) -> str:
    """The process failed as a user's mistake: exit 2, one `artscale: error:` line, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("artscale: error:")]
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards, tiny, train_cli) -> Path:
    """A real 2-step run with a checkpoint at each step (step-000001, step-000002) and final/, EMA on."""
    run = tmp_path_factory.mktemp("threats") / "run"
    proc = train_cli(tiny(run, shards, "max_steps=2", "checkpoint_every=1", "ema_decay=0.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step-000002" / "optimizer.bin").is_file()
    return run


@pytest.fixture
def copy_of(trained, tmp_path):
    """A copy of the trained run dir to damage."""

    def copy() -> Path:
        run = tmp_path / "run"
        shutil.copytree(trained, run)
        return run

    return copy


def resume(train_cli, tiny, run: Path, shards: Path):
    return train_cli(tiny(run, shards, "max_steps=3", "checkpoint_every=1", "ema_decay=0.5"))


# --- finding 6: a damaged checkpoint is one line naming it, what is wrong and what to do ------------


def test_a_truncated_optimizer_state_names_the_checkpoint_and_the_older_one(copy_of, train_cli, tiny, shards):
    run = copy_of()
    opt = run / "checkpoints" / "step-000002" / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    line = one_line_error(resume(train_cli, tiny, run, shards))
    assert f"cannot resume from checkpoint {run / 'checkpoints' / 'step-000002'}" in line
    assert "optimizer.bin is truncated or not a torch file" in line
    assert f"resume={run / 'checkpoints' / 'step-000001'}" in line


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_pickle_with_code_is_refused_without_advising_weights_only_false(
    copy_of, train_cli, tiny, shards, tmp_path
):
    import torch

    run = copy_of()
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCode(marker)}, run / "checkpoints" / "step-000002" / "optimizer.bin")
    proc = resume(train_cli, tiny, run, shards)
    line = one_line_error(proc)
    assert "optimizer.bin holds objects other than tensors (refused: loading it could run code)" in line
    assert "weights_only" not in proc.stderr + proc.stdout
    assert not marker.exists()


@pytest.mark.slow  # a training launch beyond the issue's own findings
def test_rng_states_with_code_are_refused_not_skipped(copy_of, train_cli, tiny, shards, tmp_path):
    """accelerate only logs an RNG state it cannot load and resumes on other random streams: refused here."""
    import torch

    run = copy_of()
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCode(marker)}, run / "checkpoints" / "step-000002" / "random_states_0.pkl")
    proc = resume(train_cli, tiny, run, shards)
    assert "random_states_0.pkl holds objects other than tensors" in one_line_error(proc)
    assert "weights_only" not in proc.stderr + proc.stdout and not marker.exists()


def test_a_model_file_with_code_is_refused_without_torch_advice(tmp_path):
    """An article .pth (export's input) that is a pickle with code: read_state_dict says so in its own words."""
    import torch

    from artscale.models.state_dict import read_state_dict

    marker = tmp_path / "code-ran"
    torch.save({"w": _RunsCode(marker)}, tmp_path / "model.pth")
    with pytest.raises(UserError) as e:
        read_state_dict(tmp_path / "model.pth")
    assert "refused: loading it could run code" in str(e.value) and "weights_only" not in str(e.value)
    assert not marker.exists()


def test_a_stray_custom_checkpoint_pickle_is_named(copy_of, train_cli, tiny, shards):
    run = copy_of()
    (run / "checkpoints" / "step-000002" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"a": 1}))
    line = one_line_error(resume(train_cli, tiny, run, shards))
    assert "step-000002: custom_checkpoint_0.pkl is not a file artscale writes" in line


def test_a_trainer_state_step_that_is_not_a_number_names_the_file_and_field(copy_of, train_cli, tiny, shards):
    run = copy_of()
    state = run / "checkpoints" / "step-000002" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": "abc"}))
    line = one_line_error(resume(train_cli, tiny, run, shards))
    assert f"{state}: step must be int, not str 'abc'" in line
    assert "remove that checkpoint, or resume=" in line


@pytest.mark.slow  # a training launch beyond the issue's own findings
def test_ema_weights_that_do_not_fit_the_model_name_the_file(copy_of, train_cli, tiny, shards):
    import torch
    from safetensors.torch import save_file

    run = copy_of()
    ema = run / "checkpoints" / "step-000002" / "ema.safetensors"
    save_file({"x": torch.zeros(1)}, str(ema))
    line = one_line_error(resume(train_cli, tiny, run, shards))
    assert f"{ema} lacks " in line


@pytest.mark.slow  # a training launch beyond the issue's own findings
def test_a_checkpoint_whose_saved_config_is_not_finite_is_refused(copy_of, train_cli, tiny, shards):
    run = copy_of()
    saved = run / "checkpoints" / "step-000002" / "config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "lr": float("nan")}))
    line = one_line_error(resume(train_cli, tiny, run, shards))
    assert f"{saved}: config lr=nan: must be a finite number" in line


def test_export_of_a_final_config_with_a_text_image_size_is_one_line(copy_of, run_cli, tmp_path):
    run = copy_of()
    config = run / "final" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "image_size": "abc"}))
    line = one_line_error(run_cli("export", run, tmp_path / "m.onnx"))
    assert f"{config}: image_size must be int, not str 'abc'" in line
    assert not (tmp_path / "m.onnx").exists()


def test_info_on_a_metrics_line_with_a_list_names_the_line_and_key(copy_of, run_cli):
    run = copy_of()
    metrics = run / "metrics.jsonl"
    n = len(metrics.read_text().splitlines())
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 3, "loss": [1], "lr": 0.001, "img_per_s": 3.0}) + "\n")
    line = one_line_error(run_cli("info", run))
    assert f"{metrics}: line {n + 1} loss must be float, not list [1]" in line


def test_report_on_a_metric_beyond_float32_names_the_line_and_key(copy_of, run_cli):
    run = copy_of()
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 1e308, "lr": 0.001, "img_per_s": 3.0}) + "\n")
    line = one_line_error(run_cli("report", run))
    assert "metrics.jsonl: line" in line and "loss must be within" in line and "1e+308" in line


def test_a_diverged_runs_nan_loss_is_still_reported(copy_of, run_cli):
    """NaN and inf are what a diverged run logs: they are data, not a damaged file."""
    run = copy_of()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": NaN, "lr": 0.001, "img_per_s": 3.0}\n')
    proc = run_cli("report", run)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_eval_json_with_a_list_for_its_classes_names_the_field(copy_of, run_cli):
    run = copy_of()
    record = {"fid": 12.5, "kid_mean": 0.01, "kid_std": 0.001, "generated": {"images": 4}, "real": {"images": 4}}
    (run / "eval.json").write_text(json.dumps({**record, "per_class": [1]}))
    line = one_line_error(run_cli("report", run))
    assert f"{run / 'eval.json'}: per_class must be dict, not list [1]" in line
    (run / "eval.json").write_text(json.dumps({**record, "fid": "NaN-ish", "per_class": {}}))
    assert "fid must be float, not str" in one_line_error(run_cli("report", run))


def test_a_denoiser_record_with_a_climbing_class_name_is_refused(tmp_path):
    from artscale.contracts.run_files import read_denoiser

    path = tmp_path / "denoiser.json"
    record = {"unet": {}, "scheduler": {}, "classes": ["ok", "../../x"], "null_label": 2}
    path.write_text(json.dumps({**record, "prediction_type": "v_prediction", "image_size": 16}))
    with pytest.raises(UserError, match=r"denoiser.json: classes\[1\] '../../x' must be one folder name"):
        read_denoiser(path)


def test_a_report_json_with_a_text_count_or_a_climbing_class_is_one_line(tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    report = {"written": "62", "already_done": 0, "images_in_run": 2, "count": 1, "classes": ["a"], "class": "all"}
    (out / "report.json").write_text(json.dumps(report))
    line = one_line_error(run_cli("report", out))
    assert f"{out / 'report.json'}: written must be int, not str '62'" in line
    (out / "report.json").write_text(json.dumps({**report, "written": 2, "classes": ["/etc"]}))
    line = one_line_error(run_cli("report", out))
    assert "classes[0] '/etc' must be one folder name" in line


# --- findings 6 and 7: config values are finite, typed and in their range ---------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("lr: .nan\n", "config lr=nan: must be a finite number"),
        ("lr: .inf\n", "config lr=inf: must be a finite number"),
        ("epochs: .inf\n", "config epochs=inf: must be a finite number"),
        ("batch_size: 1e30\n", "config batch_size=1e30: must be <= 65536"),
        ("perceptual_weight: .nan\n", "config perceptual_weight=nan: must be a finite number"),
        ("lr_gamma: -10\n", "config lr_gamma=-10: must be > 0"),
        ("lr_gamma: 0\n", "config lr_gamma=0: must be > 0"),
        ("lr: -0.1\n", "config lr=-0.1: must be > 0"),
        ("1: 2\n", "key 1 is not a name"),
        ("run_name: {a: 1}\n", "run_name="),
    ],
)
def test_a_config_file_with_a_bad_value_names_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, run_cli):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    line = one_line_error(run_cli("train", "--config", path))
    assert f"config file {path} is not UTF-8 text" in line


def test_every_bounded_key_refuses_nan_inf_and_values_past_its_range():
    """The ranges beside TrainConfig's fields are checked for every key, from the command line too."""
    bounded = [f for f in dataclasses.fields(TrainConfig) if "range" in f.metadata]
    assert len(bounded) >= 25
    for f in bounded:
        low, high, low_open = f.metadata["range"]
        if f.type == "float":  # low - 0.5: -1 itself is the sentinel "the objective's default" of two keys
            bad = ["nan", "inf", "-inf", str(high * 10 + 1), str(low - 0.5)]
        else:
            bad = [str(high + 1), str(low - 1), "1e400"]
        for value in bad:
            with pytest.raises(UserError, match=rf"config {f.name}="):
                load_config(None, [f"{f.name}={value}"])
        if low_open:
            with pytest.raises(UserError, match=rf"config {f.name}=.*must be > "):
                load_config(None, [f"{f.name}={low}"])


def test_the_shipped_presets_and_defaults_are_in_range():
    for name in ("article", "diffusion", "diffusion-cpu"):
        load_config(name)
    load_config(None, ["lr=0.5", "lr_gamma=1", "seed=4294967295", "num_workers=-1"])


def test_lr_inf_does_not_train(tmp_path, tiny, shards, run_cli):
    path = tmp_path / "inf.yaml"
    path.write_text("lr: .inf\n")
    proc = run_cli("train", "--config", path, *tiny(tmp_path / "run", shards, "max_steps=1"))
    assert "lr=inf: must be a finite number" in one_line_error(proc)
    assert not (tmp_path / "run" / "final").exists()


# --- finding 8: pipe: data specs run a command only when the user's environment allows it ------------


def test_a_pipe_data_spec_in_a_config_file_runs_nothing(tmp_path, tiny, run_cli):
    marker = tmp_path / "command-ran"
    path = tmp_path / "shared.yaml"
    path.write_text(f'data: "pipe:touch {marker}; cat /dev/null"\n')
    env = {k: v for k, v in os.environ.items() if k != "ARTSCALE_ALLOW_PIPE"}
    overrides = [o for o in tiny(tmp_path / "run", tmp_path, "max_steps=1") if not o.startswith("data=")]
    proc = run_cli("train", "--config", path, *overrides, env=env)
    line = one_line_error(proc)
    assert "a pipe: spec runs a shell command" in line and "ARTSCALE_ALLOW_PIPE=1" in line
    assert not marker.exists()


def test_a_pipe_spec_hidden_in_a_brace_pattern_is_refused_and_the_environment_allows_it(monkeypatch):
    from artscale.data.loader import data_spec

    monkeypatch.delenv("ARTSCALE_ALLOW_PIPE", raising=False)
    with pytest.raises(UserError, match="ARTSCALE_ALLOW_PIPE=1"):
        data_spec("{pipe:echo a,b}.tar", 16)
    monkeypatch.setenv("ARTSCALE_ALLOW_PIPE", "1")
    assert data_spec("pipe:cat x-{0..1}.tar", 16).train_urls == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]


# --- finding 12: a manifest's image size as text is named as such ----------------------------------


def test_a_text_image_size_in_a_manifest_says_so(shards, tmp_path):
    from artscale.data.loader import data_spec

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "image_size": "16"}))
    with pytest.raises(UserError) as e:
        data_spec(str(copy), 16)
    assert "image_size must be int, not str '16'" in str(e.value)
    assert "holds 16 px images but image_size=16" not in str(e.value)

"""Distillation (objective=distill): the student's targets against diffusers' own samplers, bad teachers,
exact resume, the student's run dir and ONNX sampled with their own defaults, and the quality check of
the student against its teacher."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from artscale.contracts.run_dir import load_denoiser
from artscale.core.errors import UserError
from artscale.diffusion.schedulers import make_sampler, train_scheduler


def tiny_teacher(classes: int = 3) -> torch.nn.Module:
    from artscale.models.denoiser import build_denoiser

    torch.manual_seed(0)
    return build_denoiser(16, classes, (32, 64, 64), 1, 8).eval()


def objective(teacher: torch.nn.Module, steps: int, substeps: int, solver: str, guidance: float = 2.0):
    from artscale.train.distill import Distill

    return Distill(
        train_scheduler(),
        teacher,
        num_classes=3,
        steps=steps,
        substeps=substeps,
        guidance=guidance,
        teacher_sampler=solver,
    )


@pytest.mark.parametrize("solver", ["ddim", "dpm++"])
def test_the_teachers_substeps_are_diffusers_own_sampler_over_the_same_timesteps(solver):
    """One student step from t=999 to the clean image in 4 teacher substeps is diffusers' sampler at 4 steps,
    guided, from the same noise (DPM-Solver++(2M) with its first and last steps first order)."""
    from artscale.diffusion.sampling import sample, torch_predict

    teacher = tiny_teacher()
    distill = objective(teacher, steps=1, substeps=4, solver=solver)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])  # 3: the null class
    want = sample(
        torch_predict(teacher), make_sampler(solver, train_scheduler().config), noise, labels, 3, steps=4, guidance=2.0
    )
    t, s = torch.full((4,), 999), torch.full((4,), -1)
    got = distill.teacher_lands(noise, t, s, labels)  # the samplers start from the noise itself
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_the_students_target_is_the_prediction_whose_ddim_step_lands_where_the_teacher_did():
    teacher = tiny_teacher()
    distill = objective(teacher, steps=4, substeps=2, solver="dpm++")
    assert distill.t_grid.tolist() == [999, 749, 499, 249] and distill.s_grid.tolist() == [749, 499, 249, -1]
    g = torch.Generator().manual_seed(2)
    for k in range(4):
        t, s = distill.t_grid[[k, k]], distill.s_grid[[k, k]]
        x_t, labels = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([1, 3])
        x_s = distill.teacher_lands(x_t, t, s, labels)
        target = distill.target(x_t, x_s, t, s)
        ddim = make_sampler("ddim", train_scheduler().config)
        ddim.set_timesteps(4)
        landed = ddim.step(target, int(t[0]), x_t).prev_sample
        torch.testing.assert_close(landed, x_s, atol=1e-4, rtol=1e-4)


def test_config_refuses_a_distill_run_without_a_teacher_or_with_another_sampler():
    from artscale.train.config import load_config

    with pytest.raises(UserError, match="needs teacher=RUN_DIR"):
        load_config("distill-cpu", ["teacher="])
    with pytest.raises(UserError, match="samples with ddim"):
        load_config("distill-cpu", ["sampler=dpm++"])
    cfg = load_config("distill-cpu")
    assert (cfg.objective, cfg.sampler, cfg.sample_steps, cfg.guidance, cfg.ema_decay > 0) == (
        "distill",
        "ddim",
        4,
        2.0,
        True,
    )


def test_bad_teachers_are_one_line(tmp_path, make_run_dir, make_diffusion_run, diffusion_classes):
    from artscale.train.distill import load_teacher

    cases = {
        "missing": (tmp_path / "nowhere", "not found"),
        "article": (make_run_dir(tmp_path / "article"), "not a diffusion run"),
        "empty": (tmp_path / "empty", "holds no weights"),
    }
    (tmp_path / "empty").mkdir()
    no_ema = make_diffusion_run(tmp_path / "no-ema")
    (no_ema / "final" / "ema.safetensors").unlink()
    cases["no ema"] = (no_ema, "holds no EMA weights")
    cases["size"] = (make_diffusion_run(tmp_path / "size32", size=32), "32 px")
    for name, (path, words) in cases.items():
        with pytest.raises(UserError, match=words) as e:
            load_teacher(str(path), 16, diffusion_classes)
        assert "\n" not in str(e.value) and str(path) in str(e.value), name
    with pytest.raises(UserError, match="other classes"):
        load_teacher(str(make_diffusion_run(tmp_path / "ok")), 16, ["a", "b", "c"])
    unet, meta = load_teacher(str(tmp_path / "ok"), 16, diffusion_classes)
    assert meta["weights"] == "ema" and not any(p.requires_grad for p in unet.parameters())


def test_a_bad_teacher_stops_the_command_before_any_step(tmp_path, shards, make_run_dir, train_cli, tiny):
    run = tmp_path / "student"
    proc = train_cli(["--config", "distill-cpu", *tiny(run, shards, f"teacher={make_run_dir(tmp_path / 'article')}")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "not a diffusion run" in proc.stderr
    assert not run.exists()


@pytest.fixture(scope="module")
def teacher16(tmp_path_factory, make_diffusion_run, classes) -> Path:
    """A random-init teacher over the `shards` fixture's classes, at 16 px, recording its sampling."""
    run = make_diffusion_run(tmp_path_factory.mktemp("teacher") / "run", classes=classes, step=9)
    for path in (run / "config.json", run / "final" / "config.json"):
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "sampler": "ddim", "sample_steps": 5, "guidance": 1.5}))
    return run


@pytest.mark.slow
def test_a_resumed_distill_run_ends_bit_identical_raw_and_ema(teacher16, shards, tmp_path, train_cli, tiny):
    opts = ["--config", "distill-cpu"]
    keys = [f"teacher={teacher16}", "max_steps=4", "grad_accum=2", "teacher_substeps=2", "cond_drop=0.5"]
    whole = train_cli([*opts, *tiny(tmp_path / "whole", shards, *keys)])
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    first = train_cli([*opts, *tiny(cut, shards, *keys, "max_steps=2", "checkpoint_every=2")])
    assert first.returncode == 0, first.stderr[-3000:]
    again = train_cli([*opts, *tiny(cut, shards, *keys)])
    assert again.returncode == 0 and "resumed from step 2" in again.stdout, again.stderr[-3000:]
    moved = 0
    teacher = load_file(teacher16 / "final" / "ema.safetensors")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "whole" / "final" / name), load_file(cut / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        moved += any(not torch.equal(a[k], teacher[k]) for k in a)
    assert moved == 2  # the student trained away from the teacher's weights it started from


@pytest.fixture(scope="module")
def student16(teacher16, shards, tmp_path_factory, train_cli, tiny) -> Path:
    run = tmp_path_factory.mktemp("student") / "run"
    keys = [f"teacher={teacher16}", "max_steps=2", "teacher_substeps=2", "sample_steps=3", "guidance=2.5"]
    proc = train_cli(["--config", "distill-cpu", *tiny(run, shards, *keys)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_student_run_dir_says_what_it_is_and_samples_with_its_own_steps(student16, teacher16, tmp_path, run_cli):
    from artscale.infer.sample import sample_images

    record = json.loads((student16 / "final" / "denoiser.json").read_text())
    assert record["sampling"] == {"sampler": "ddim", "steps": 3, "guidance": 2.5, "guidance_baked": True}
    assert record["distilled"]["teacher"] == str(teacher16) and record["distilled"]["teacher_step"] == 9
    report = sample_images(student16, tmp_path / "a", count=3, seed=4, batch_size=2)
    assert (report["sampler"], report["steps"], report["guidance"], report["passes_per_step"]) == ("ddim", 3, 2.5, 1)
    assert report["sampling_from"] == {"sampler": "model", "steps": "model", "guidance": "model"}
    same = sample_images(student16, tmp_path / "b", count=3, seed=4, batch_size=5, guidance=2.5, steps=3)
    assert same["sampling_from"]["guidance"] == "flag"
    for f in (tmp_path / "a").rglob("*.png"):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    with pytest.raises(UserError, match="guidance 2.5 baked in"):
        sample_images(student16, tmp_path / "c", count=1, guidance=3.0)
    proc = run_cli("sample", student16, tmp_path / "d", "--count", "1", "--guidance", "1")
    assert proc.returncode == 2 and "baked in" in proc.stderr and proc.stderr.strip().count("\n") == 0
    info = run_cli("info", student16)
    assert info.returncode == 0 and f"distilled from {teacher16}" in info.stdout, info.stderr
    assert "ddim 3 steps, guidance 2.5 (1 pass per step)" in info.stdout
    report = run_cli("report", student16, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert f"distilled from {teacher16}" in (tmp_path / "report" / "index.html").read_text()


def test_a_teachers_sampling_comes_from_its_run_unless_a_flag_says_otherwise(teacher16, tmp_path):
    from artscale.infer.sample import sample_images

    report = sample_images(teacher16, tmp_path / "a", count=1, class_name="drawings", batch_size=1)
    assert (report["sampler"], report["steps"], report["guidance"], report["passes_per_step"]) == ("ddim", 5, 1.5, 2)
    assert set(report["sampling_from"].values()) == {"model"}
    report = sample_images(teacher16, tmp_path / "b", count=1, class_name="drawings", steps=2, guidance=1.0)
    assert (report["sampler"], report["steps"], report["guidance"], report["passes_per_step"]) == ("ddim", 2, 1.0, 1)
    assert report["sampling_from"] == {"sampler": "model", "steps": "flag", "guidance": "flag"}


@pytest.mark.slow
def test_a_students_onnx_samples_its_run_dirs_images_and_img2img_takes_its_defaults(student16, tmp_path, run_cli):
    from artscale.export.denoiser import export_denoiser
    from artscale.infer.img2img import Variations
    from artscale.infer.sample import open_denoiser, sample_images

    onnx = tmp_path / "student.onnx"
    export_denoiser(student16, onnx)
    torch_run = sample_images(student16, tmp_path / "torch", count=4, seed=2, batch_size=4)
    for batch in (1, 3):
        report = sample_images(onnx, tmp_path / f"onnx{batch}", count=4, seed=2, batch_size=batch)
        assert (report["steps"], report["passes_per_step"], report["guidance"]) == (3, 1, 2.5)
        assert report["distilled"]["steps"] == 3
    assert torch_run["written"] == 20
    for f in sorted((tmp_path / "onnx1").rglob("*.png")):
        other = tmp_path / "onnx3" / f.relative_to(tmp_path / "onnx1")
        assert f.read_bytes() == other.read_bytes()
        from PIL import Image

        a = np.asarray(Image.open(f), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "torch" / f.relative_to(tmp_path / "onnx1")), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
    info = run_cli("info", onnx)
    assert info.returncode == 0 and "distilled student" in info.stdout and "3 steps" in info.stdout
    session, _, _ = open_denoiser(onnx, "cpu", False)
    runner = Variations(session, class_name="drawings", strength=0.5)
    assert (
        runner.settings["steps"] == 3 and runner.settings["guidance"] == 2.5 and runner.settings["passes_per_step"] == 1
    )
    with pytest.raises(UserError, match="baked in"):
        Variations(session, guidance=4.0)


@pytest.mark.slow
def test_the_student_at_its_steps_keeps_the_teachers_quality(
    quality_teacher, quality, art_shards, tmp_path, train_cli, tiny, child_cpu_s
):
    """The distill-cpu preset on the quality check's teacher (diffusion-cpu, 16 px): the student at its 4 steps
    of one pass against the teacher at 20 DPM++ steps of guidance 2 (two passes): class accuracy within 2 points,
    every class at least 0.9x the teacher's variety; and its training's CPU time at most twice the teacher's."""
    from artscale.train.config import load_config

    preset = load_config("distill-cpu")
    run = tmp_path / "student"
    started, cpu = time.monotonic(), child_cpu_s()
    proc = train_cli(
        [
            "--config",
            "distill-cpu",
            *tiny(
                run,
                art_shards,
                f"teacher={quality_teacher.run}",
                f"batch_size={preset.batch_size}",
                f"max_steps={preset.max_steps}",
                f"sample_steps={preset.sample_steps}",
                "log_every=25",
                f"checkpoint_every={preset.max_steps}",
                f"val_every={preset.max_steps}",
            ),
        ],
        timeout=600,
    )
    distill_s, distill_cpu_s = time.monotonic() - started, child_cpu_s() - cpu
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher, teacher_meta = load_denoiser(quality_teacher.run)
    student, meta = load_denoiser(run)
    t = quality_teacher.preset
    a = quality(teacher, teacher_meta, t.sampler, t.sample_steps, t.guidance)
    b = quality(student, meta, preset.sampler, preset.sample_steps, 1.0)
    ratio = [s / max(r, 1e-9) for s, r in zip(b["diversity"], a["diversity"])]
    print(
        f"\nteacher ({t.sampler} {t.sample_steps} steps, guidance {t.guidance:g}; trained in {quality_teacher.train_s:.0f} s, "
        f"{quality_teacher.cpu_s:.0f} CPU s): "
        f"accuracy {np.mean(a['accuracy']):.3f}, diversity {' '.join(f'{d:.2f}' for d in a['diversity'])}"
        f"\nstudent ({preset.sample_steps} steps; distilled in {distill_s:.0f} s, {distill_cpu_s:.0f} CPU s): accuracy {np.mean(b['accuracy']):.3f}, "
        f"diversity {' '.join(f'{d:.2f}' for d in b['diversity'])}, x teacher {' '.join(f'{r:.2f}' for r in ratio)}"
    )
    assert np.mean(b["accuracy"]) >= np.mean(a["accuracy"]) - 0.02
    assert min(ratio) >= 0.9
    assert distill_cpu_s <= 2 * quality_teacher.cpu_s


# --- the sampling and distilled records read back: denoiser.json, ONNX metadata, report.json ---------------

SAMPLING = {"sampler": "ddim", "steps": 4, "guidance": 2.0, "guidance_baked": True}
DISTILLED = {
    "teacher": "/runs/teacher",
    "teacher_step": 400,
    "teacher_weights": "ema",
    "steps": 4,
    "teacher_substeps": 5,
    "teacher_sampler": "dpm++",
    "guidance": 2.0,
    "guidance_input": False,
}
BAD_RECORDS = [
    ("sampling", {"steps": "4"}, "sampling.steps must be int, not str '4'"),
    ("sampling", {"steps": 0}, "sampling.steps must be >= 1, not 0"),
    ("sampling", {"guidance": float("nan")}, "sampling.guidance must be a finite number, not nan"),
    ("sampling", {"sampler": "euler"}, "sampling.sampler must be one of ddim, dpm++, not 'euler'"),
    ("sampling", {"guidance_baked": "yes"}, "sampling.guidance_baked must be bool"),
    ("distilled", {"teacher": "/runs/t\x1b[2J"}, "distilled.teacher must be a path without control characters"),
    ("distilled", {"teacher": 7}, "distilled.teacher must be str, not int 7"),
    ("distilled", {"teacher_substeps": 0}, "distilled.teacher_substeps must be >= 1, not 0"),
    ("distilled", {"guidance": float("inf")}, "distilled.guidance must be a finite number, not inf"),
    ("distilled", {"teacher_step": -1}, "distilled.teacher_step must be >= 0, not -1"),
    ("distilled", {"teacher_sampler": "heun"}, "distilled.teacher_sampler must be one of ddim, dpm++"),
]


def denoiser_record(**changes) -> dict:
    record = {"unet": {}, "scheduler": {"num_train_timesteps": 1000}, "classes": ["a", "b"], "null_label": 2}
    return {**record, "prediction_type": "v_prediction", "image_size": 16, **changes}


@pytest.mark.parametrize("key,change,message", BAD_RECORDS)
def test_a_denoiser_json_with_a_bad_sampling_or_distilled_record_names_the_field(tmp_path, key, change, message):
    from artscale.contracts.run_files import read_denoiser

    path = tmp_path / "denoiser.json"
    path.write_text(json.dumps(denoiser_record(sampling=SAMPLING, distilled=DISTILLED)))
    assert read_denoiser(path)["distilled"] == DISTILLED
    path.write_text(
        json.dumps(denoiser_record(**{key: {**{"sampling": SAMPLING, "distilled": DISTILLED}[key], **change}}))
    )
    with pytest.raises(UserError) as e:
        read_denoiser(path)
    assert f"{path}: {message}" in str(e.value)


def onnx_with(props: dict[str, str], path: Path) -> Path:
    """An identity model carrying a diffusion denoiser's metadata: what read_metadata reads."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("key,change,message", BAD_RECORDS[:3] + BAD_RECORDS[5:8])
def test_onnx_metadata_with_a_bad_sampling_or_distilled_record_names_the_field(tmp_path, key, change, message):
    import onnxruntime as ort

    from artscale.contracts.onnx import describe_onnx, read_metadata

    base = {"objective": "diffusion", "classes": '["a", "b"]', "null_label": "2", "image_size": "16"}
    base |= {"prediction_type": "v_prediction", "scheduler": '{"num_train_timesteps": 1000}'}
    good = onnx_with(
        {**base, "sampling": json.dumps(SAMPLING), "distilled": json.dumps(DISTILLED)}, tmp_path / "g.onnx"
    )
    meta = read_metadata(ort.InferenceSession(str(good), providers=["CPUExecutionProvider"]), good)
    assert (meta["sampling"], meta["distilled"]) == (SAMPLING, DISTILLED)
    assert "distilled student of /runs/teacher (step 400): 4 steps, guidance 2 baked in" in describe_onnx(good)
    record = {**{"sampling": SAMPLING, "distilled": DISTILLED}[key], **change}
    bad = onnx_with({**base, key: json.dumps(record)}, tmp_path / "b.onnx")
    with pytest.raises(UserError) as e:
        read_metadata(ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"]), bad)
    assert f"{bad}: metadata {message}" in str(e.value)
    assert "\x1b" not in describe_onnx(bad) and f"unreadable: {bad}: metadata {key}." in describe_onnx(bad)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"passes_per_step": 3}, "passes_per_step must be <= 2, not 3"),
        ({"sampling_from": {"steps": "guessed"}}, "sampling_from maps sampler, steps and guidance to one of"),
        ({"sampling_from": ["flag"]}, "sampling_from must be dict, not list"),
        ({"distilled": {**DISTILLED, "teacher": "a\nb"}}, "distilled.teacher must be a path without control"),
        ({"variation": {"passes_per_step": 0}}, "variation.passes_per_step must be >= 1, not 0"),
    ],
)
def test_a_report_json_with_bad_sampling_keys_names_the_field(tmp_path, change, message):
    from artscale.infer.outputs import check_report

    path = tmp_path / "report.json"
    good = {"written": 2, "sampling_from": {"sampler": "model", "steps": "flag", "guidance": "default"}}
    good |= {"passes_per_step": 1, "distilled": DISTILLED}
    assert check_report(good, path) == good
    with pytest.raises(UserError) as e:
        check_report({**good, **change}, path)
    assert f"{path}: {message}" in str(e.value)

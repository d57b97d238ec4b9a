"""`artscale submit pipeline`: the sbatch lines and what each waits for (no SLURM needed), what a rerun does
with the jobs an earlier run left, and on the real local SLURM the whole chain from one command to the
report, with a stage that fails, the rerun that finishes it, and the training job preempted on the way."""

from __future__ import annotations

import html.parser
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artscale.cluster.pipeline import NEVER, Job, Stage, job_name, plan_steps
from artscale.cluster.slurm import SBATCH_DIR

NO_SLURM = {"PATH": str(Path(sys.executable).parent)}  # for run_cli: no sbatch, sinfo nor squeue
STAGES = [
    "pack",
    "train",
    "export",
    "sample",
    "sample-merge",
    "generate-list",
    "generate",
    "generate-merge",
    "report",
]


def _by_stage(out: Path, stdout: str) -> dict[str, list[str]]:
    lines = {}
    for line in stdout.splitlines():
        if line.startswith("sbatch "):
            args = shlex.split(line)
            name = next(a for a in args if a.startswith("--job-name=")).split("=", 1)[1]
            [stage] = [s for s in STAGES if job_name(out, s) == name]
            lines[stage] = args
    return lines


def _after(args: list[str]) -> str:
    return next((a.split(":", 1)[1] for a in args if a.startswith("--dependency=afterok:")), "")


def _script_args(args: list[str]) -> list[str]:
    at = next(i for i, a in enumerate(args) if a.startswith(str(SBATCH_DIR)))
    return [Path(args[at]).name, *args[at + 1 :]]


def test_dry_run_prints_every_stage_with_what_it_waits_for(image_folder, tmp_path, run_cli):
    out = (tmp_path / "out").resolve()
    dry = run_cli(
        "submit",
        "pipeline",
        image_folder,
        "max_steps=7",  # overrides before, between and after the flags
        "--config",
        "diffusion-cpu",
        "--out",
        out,
        "image_size=16",
        "--size",
        "16",
        "--val-fraction",
        "0.2",
        "--follow-symlinks",
        "--sample",
        "3",
        "--generate",
        image_folder,
        "--tasks",
        "4",
        "--gpus-per-node",
        "2",
        "--gpus-per-task",
        "1",
        "--time",
        "12:00:00",
        "--array-time",
        "1:00:00",
        "--partition",
        "gpu",
        "--sbatch-arg=--qos=high",
        "--sample-args",
        "--steps 30",
        "--export-args=--fp16",  # one flag alone needs the = (argparse takes it for a flag of its own)
        "ema_decay=0.5",
        "--dry-run",
        env=NO_SLURM,
    )
    assert dry.returncode == 0 and dry.stderr == "", dry.stderr
    lines = _by_stage(out, dry.stdout)
    assert list(lines) == STAGES and len(dry.stdout.splitlines()) == len(STAGES)
    waits = {stage: _after(args) for stage, args in lines.items()}
    assert waits == {
        "pack": "",
        "train": "{pack}",
        "export": "{train}",
        "sample": "{export}",
        "sample-merge": "{sample}",
        "generate-list": "{export}",
        "generate": "{generate-list}",
        "generate-merge": "{generate}",
        "report": "{sample-merge}:{generate-merge}",
    }
    for stage, args in lines.items():
        assert args[0] == "sbatch" and "--partition=gpu" in args and "--qos=high" in args, stage
        assert ("--kill-on-invalid-dep=no" in args) == (stage != "pack"), stage  # pending behind a failure
        assert [a for a in args if a.startswith("--job-name=")] == [f"--job-name={job_name(out, stage)}"]
        log = f"--output={out / 'logs' / stage}-" + ("%A_%a.out" if stage in ("sample", "generate") else "%j.out")
        assert log in args, stage
        # training's time limit is training's, the arrays' the arrays' tasks', the rest keep their scripts'
        timed = {"train": "--time=12:00:00", "sample": "--time=1:00:00", "generate": "--time=1:00:00"}
        assert [a for a in args if a.startswith("--time=")] == ([timed[stage]] if stage in timed else []), stage
    shards, run, model = out / "shards", out / "run", out / "model.onnx"
    assert _script_args(lines["pack"]) == [
        "pack.sbatch",
        str(image_folder),
        str(shards),
        "--size",
        "16",
        "--val-fraction",
        "0.2",
        "--follow-symlinks",
    ]
    train = lines["train"]
    assert "--gpus-per-node=2" in train and "--cpus-per-task=16" in train and "--signal=B:USR1@300" in train
    assert _script_args(train) == [
        "train.sbatch",
        "--config",
        "diffusion-cpu",
        "max_steps=7",
        "image_size=16",
        "ema_decay=0.5",
        f"data={shards}",
        f"run_dir={run}",
    ]
    assert _script_args(lines["export"]) == ["artscale.sbatch", "export", str(run), str(model), "--fp16"]
    assert "--array=0-3" in lines["sample"] and "--gpus-per-task=1" in lines["sample"]
    assert _script_args(lines["sample"]) == [
        "generate.sbatch",
        "sample",
        str(model),
        str(out / "samples"),
        "--count",
        "3",
        "--device",
        "cuda",
        "--steps",
        "30",
    ]
    assert _script_args(lines["sample-merge"]) == ["generate-merge.sbatch", str(out / "samples"), "4", "--sample"]
    generate = [str(model), str(image_folder), str(out / "generated"), "--device", "cuda"]
    assert _script_args(lines["generate-list"]) == ["generate-list.sbatch", *generate]
    assert _script_args(lines["generate"]) == ["generate.sbatch", *generate]
    assert _script_args(lines["report"]) == [
        "artscale.sbatch",
        "report",
        str(run),
        str(out / "samples"),
        str(out / "generated"),
        "--out",
        str(out / "report"),
    ]
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_leaves_out_what_has_finished(image_folder, shards, make_diffusion_run, tmp_path, run_cli):
    """Shards at the training size and a finished run: pack and train are not submitted, the export waits for nothing."""
    out = (tmp_path / "out").resolve()
    shutil.copytree(shards, out / "shards")
    make_diffusion_run(out / "run", size=16)
    args = ("submit", "pipeline", image_folder, "--config", "diffusion-cpu", "--out", out, "image_size=16")
    dry = run_cli(*args, "--dry-run", env=NO_SLURM)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:2] == [
        f"# pack: finished ({out / 'shards' / 'manifest.json'} of {image_folder.resolve()} at 16 px): not submitted",
        f"# train: finished ({out / 'run' / 'final'}): not submitted",
    ]
    lines = _by_stage(out, dry.stdout)
    assert (
        list(lines) == ["export", "report"] and _after(lines["export"]) == "" and _after(lines["report"]) == "{export}"
    )
    # at another size the shards are not the ones training needs: packed again, and everything after
    other = run_cli(*args, "image_size=32", "--dry-run", env=NO_SLURM)
    assert list(_by_stage(out, other.stdout)) == ["pack", "train", "export", "report"], other.stderr
    # ... and so are shards of another collection (pack then refuses, in its log, to mix them)
    (tmp_path / "other").mkdir()
    elsewhere = run_cli(*args[:2], tmp_path / "other", *args[3:], "--dry-run", env=NO_SLURM)
    assert list(_by_stage(out, elsewhere.stdout)) == ["pack", "train", "export", "report"], elsewhere.stderr


@pytest.mark.parametrize(
    "args, said",
    [
        (["data=/elsewhere"], "data: the pipeline sets them (data="),
        (["no_such_key=1"], "unknown config key no_such_key"),
        (["--size", "32"], "--size 32 but the training config's image_size is 16: give image_size=32"),
        (["--config", "article"], "--sample draws from a diffusion model; this config trains objective=reconstruct"),
        (["--generate", "/no/such/folder"], "--generate /no/such/folder: not a folder"),
        (["--out", "INSIDE"], "lies inside SRC"),
    ],
)
def test_a_mistake_is_one_line_before_anything_is_queued(image_folder, tmp_path, run_cli, args, said):
    args = [image_folder / "painting" / "out" if a == "INSIDE" else a for a in args]
    base = ["--config", "diffusion-cpu", "--out", tmp_path / "out", "image_size=16", "--sample", "2"]
    bad = run_cli("submit", "pipeline", image_folder, *base, *args, env=NO_SLURM)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr
    assert said in bad.stderr and not (tmp_path / "out").exists()


def _stages(finished: set[str]) -> list[Stage]:
    chain = [("pack", ()), ("train", ("pack",)), ("export", ("train",)), ("sample", ("export",))]
    chain += [("sample-merge", ("sample",)), ("report", ("sample-merge",))]
    return [Stage(name, ["sbatch", "x.sbatch"], after, lambda n=name: n in finished, name) for name, after in chain]


def _plan(steps) -> list[tuple]:
    return [(s.stage.name, s.action, (s.job or s.replaces or Job("", "", "")).id, s.after) for s in steps]


def test_a_rerun_waits_for_what_is_queued_and_replaces_what_a_failure_left_pending():
    # training failed: the export waits for it in vain (NEVER), the rest behind the export
    left = {
        "export": Job("12", "PENDING", NEVER),
        "sample": Job("13", "PENDING", "Dependency"),
        "sample-merge": Job("14", "PENDING", "Dependency"),
        "report": Job("15", "PENDING", "Dependency"),
    }
    assert _plan(plan_steps(_stages({"pack", "export"}), left)) == [
        ("pack", "finished", "", []),
        ("train", "submit", "", []),
        ("export", "submit", "12", ["{train}"]),  # finished by an earlier run, but training is about to change
        ("sample", "submit", "13", ["{export}"]),
        ("sample-merge", "submit", "14", ["{sample}"]),
        ("report", "submit", "15", ["{sample-merge}"]),
    ]
    # training requeued after a preemption, the export behind it; the sampling array was cancelled by hand,
    # so its merge waits in vain: the array and the merge again, behind the export that is still queued
    queued = {
        "train": Job("20", "PENDING", "BeginTime"),
        "export": Job("21", "PENDING", "Dependency"),
        "sample-merge": Job("23", "PENDING", NEVER),
        "report": Job("24", "PENDING", "Dependency"),
    }
    assert _plan(plan_steps(_stages({"pack"}), queued)) == [
        ("pack", "finished", "", []),
        ("train", "queued", "20", []),
        ("export", "queued", "21", []),
        ("sample", "submit", "", ["21"]),
        ("sample-merge", "submit", "23", ["{sample}"]),
        ("report", "submit", "24", ["{sample-merge}"]),
    ]
    # everything written: nothing to do; a running job is never replaced
    assert {s.action for s in plan_steps(_stages(set(STAGES)), {})} == {"finished"}
    running = plan_steps(_stages({"pack"}), {"train": Job("30", "RUNNING", "None")})
    assert [s.action for s in running] == ["finished", "queued", "submit", "submit", "submit", "submit"]


# --- on the real local SLURM ------------------------------------------------------------------


@pytest.mark.slurm
def test_each_job_is_fitted_to_the_nodes_and_a_refusal_names_the_pipelines_flag(slurm, image_folder, tmp_path, run_cli):
    """Nothing is submitted: a CPU count no node has is refused, naming the flag that asked for it."""
    sinfo = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c"], capture_output=True, text=True)
    cpus = int(sinfo.stdout.split()[0])
    base = ("submit", "pipeline", image_folder, "--config", "diffusion-cpu", "--out", tmp_path / "out", "--sample", "2")
    for flag in ("--cpus-per-task", "--pack-cpus", "--array-cpus-per-task"):
        bad = run_cli(*base, flag, cpus + 1)
        assert bad.returncode == 2 and bad.stdout == "", bad.stderr
        assert bad.stderr.splitlines()[-1] == (
            f"artscale: error: {flag} {cpus + 1}: no node of partition local has more than {cpus} CPUs; "
            f"pass {flag} {cpus} or less"
        )
    assert not (tmp_path / "out").exists()


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.found += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")]


def _submitted(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^(\S+): submitted job (\d+)", stdout, re.MULTILINE))


@pytest.fixture
def cancel_at_end():
    """Job ids to cancel when the test ends: a failed test leaves nothing pending on the cluster."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_one_command_runs_the_chain_and_its_rerun_finishes_what_failed(
    slurm, image_folder, make_image, tiny, env, tmp_path, run_cli, job_info, wait_job, cancel_at_end
):
    gen_in = tmp_path / "in"
    for i in range(3):
        make_image(gen_in / "a" / f"{i}.png", (24, 20), seed=i)
    out = tmp_path / "out"
    steps = ("max_steps=4", "val_batches=1")  # the preemption below stops it at step 1: a step before the last
    train = [o for o in tiny(out / "run", out / "shards", *steps) if not o.startswith(("data=", "run_dir="))]
    command = [
        *("submit", "pipeline", image_folder, "--config", "diffusion-cpu", "--out", out, *train),
        *("--size", "16", "--val-fraction", "0.2", "--sample", "1", "--generate", gen_in, "--tasks", "2"),
        *("--pack-cpus", "1", "--array-cpus-per-task", "1"),
        *("--sample-args", "--steps 2 --batch-size 4", "--generate-args", "--steps 2 --batch-size 2"),
    ]
    # a training override that load_config accepts and training refuses: the chain stops at training
    jobs_env = env()  # what every job inherits (sbatch passes it on): one OpenMP thread, no progress bars
    first = run_cli(*command, "resume=/no/such/checkpoint", cwd=tmp_path, env=jobs_env)
    assert first.returncode == 0, first.stderr
    ids = _submitted(first.stdout)
    cancel_at_end += ids.values()
    assert list(ids) == STAGES, first.stdout
    [trained] = wait_job(ids["train"], 240)
    train_log = (out / "logs" / f"train-{ids['train']}.out").read_text()
    assert trained["JobState"] == "FAILED" and "resume=/no/such/checkpoint" in train_log, train_log
    assert json.loads((out / "shards" / "manifest.json").read_text())["image_size"] == 16
    # the stages after it do not run: the export pends with DependencyNeverSatisfied, the rest behind it
    wait_job(ids["export"], 30, until=lambda r: r[0].get("Reason") == NEVER)
    for stage in STAGES[2:]:
        assert {r["JobState"] for r in job_info(ids[stage])} == {"PENDING"}, stage
    see = re.search(r"^ +see them: +(squeue .*)$", first.stdout, re.MULTILINE).group(1)
    shown = subprocess.run(see, shell=True, capture_output=True, text=True)
    assert shown.returncode == 0 and NEVER in shown.stdout, shown.stderr
    assert all(ids[stage] in shown.stdout for stage in STAGES[2:]), shown.stdout
    assert re.search(r"^ +clear them: +scancel " + " ".join(ids[s] for s in STAGES) + "$", first.stdout, re.M)

    # the override fixed and the same command again: pack is not run again, the jobs left pending are replaced
    second = run_cli(*command, cwd=tmp_path, env=jobs_env)
    assert second.returncode == 0, second.stderr
    manifest = out.resolve() / "shards" / "manifest.json"
    assert f"# pack: finished ({manifest} of {image_folder.resolve()} at 16 px): not submitted" in second.stdout
    assert re.findall(r"job (\d+) was left pending", second.stdout) == [ids[s] for s in STAGES[2:]]
    again = _submitted(second.stdout)
    cancel_at_end += again.values()
    assert list(again) == STAGES[1:] and not set(again.values()) & set(ids.values())
    for stage in STAGES[2:]:
        assert {r["JobState"] for r in job_info(ids[stage])} == {"CANCELLED"}, stage
    # ... and once more while they are queued: nothing is submitted twice
    third = run_cli(*command, cwd=tmp_path, env=jobs_env)
    assert third.returncode == 0 and _submitted(third.stdout) == {}, third.stdout
    for stage in STAGES[1:]:
        assert f"# {stage}: already queued as job {again[stage]} (" in third.stdout or (
            stage == "train" and "# train: finished" in third.stdout
        ), third.stdout

    # preempted on the way (what --signal=B:USR1@N does near the time limit): it checkpoints, requeues and
    # resumes, and the stages after it wait for it through the requeue
    log_path = out / "logs" / f"train-{again['train']}.out"
    deadline = time.monotonic() + 180
    while "artscale: machine 0:" not in (log_path.read_text() if log_path.exists() else ""):
        assert time.monotonic() < deadline, f"training did not start: {job_info(again['train'])}"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", again["train"]], check=True)
    [reported] = wait_job(again["report"], 420)
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert reported["JobState"] == "COMPLETED", logs
    [trained] = job_info(again["train"])
    train_log = log_path.read_text()
    assert trained["JobState"] == "COMPLETED" and trained["Restarts"] == "1", train_log
    assert "requeueing job" in train_log and "resumed from step" in train_log
    assert json.loads((out / "run" / "final" / "trainer_state.json").read_text())["step"] == 4

    samples = json.loads((out / "samples" / "report.json").read_text())
    generated = json.loads((out / "generated" / "report.json").read_text())
    assert (samples["images_in_run"], samples["num_shards"]) == (5, 2)  # 1 per class, 5 classes
    assert (generated["written"], generated["num_shards"]) == (3, 2)
    index = out / "report" / "index.html"
    page = index.read_text()
    for section in (out / "run", out / "samples", out / "generated"):
        assert str(section.resolve()) in page
    links = _Links()
    links.feed(page)
    assert len(links.found) >= 5 + 3 and all((index.parent / link).is_file() for link in links.found), links.found

    # everything has finished: the same command submits nothing
    last = run_cli(*command, cwd=tmp_path, env=jobs_env)
    assert last.returncode == 0 and _submitted(last.stdout) == {}, last.stdout
    assert last.stdout.count(": finished (") == len(STAGES) and "nothing to submit" in last.stdout

"""`artscale submit pipeline`: pack -> train -> export -> sample/generate arrays -> merges -> report, as
SLURM jobs joined by `--dependency=afterok:ID` (ids from `sbatch --parsable`), safe to run again.

Each stage is the sbatch line a user would submit alone: the builders of `artscale submit train|sample|
generate` (artscale/cluster/slurm.py), pack.sbatch, and artscale.sbatch for the export and the report.
A failed stage leaves the ones after it pending (`--kill-on-invalid-dep=no`, whatever the cluster's
default), so squeue shows where the chain stopped.

Running the command again submits only what is not finished, read from what each stage wrote (the
manifest, the run's final/, the .onnx, the merged report.json, the report's index.html), and finds the
jobs an earlier run queued by their names, stable per OUT and stage (`squeue --name`): one still queued
or running is waited for, never submitted twice; one left pending behind a failed or cancelled stage
is cancelled and submitted again behind its new predecessor.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from artscale.cluster.nodes import fit_submission
from artscale.cluster.slurm import (
    SBATCH_DIR,
    Placement,
    array_sbatch_commands,
    run_finished,
    sbatch_parsable,
    train_sbatch_command,
)
from artscale.core.errors import UserError

PACK_SCRIPT = SBATCH_DIR / "pack.sbatch"
COMMAND_SCRIPT = SBATCH_DIR / "artscale.sbatch"  # one artscale command: export, report
NEVER = "DependencyNeverSatisfied"  # squeue's reason for a job behind a failed or cancelled one
SQUEUE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under OUT."""

    out: Path

    shards = property(lambda self: self.out / "shards")
    run = property(lambda self: self.out / "run")
    model = property(lambda self: self.out / "model.onnx")
    samples = property(lambda self: self.out / "samples")
    generated = property(lambda self: self.out / "generated")
    report = property(lambda self: self.out / "report")
    logs = property(lambda self: self.out / "logs")


@dataclass(frozen=True)
class Stage:
    name: str
    line: list[str]  # the stage's own sbatch line; the pipeline adds its job name, log and dependency
    after: tuple[str, ...]  # the stages it waits for
    finished: Callable[[], bool]  # from what the stage wrote
    mark: str  # what says it finished, for the messages
    array: bool = False


@dataclass(frozen=True)
class Job:
    """A job of this pipeline that squeue still lists."""

    id: str
    state: str
    reason: str

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"


@dataclass
class Step:
    """What the pipeline does with one stage: `finished` (skip), `queued` (wait for `job`), or `submit`
    (after `after`: job ids, or `{stage}` for a stage submitted in this same run), cancelling `replaces` first."""

    stage: Stage
    action: str
    job: Job | None = None
    replaces: Job | None = None
    after: list[str] = field(default_factory=list)


def job_name(out: Path, stage: str) -> str:
    """A stage's job name: stable per OUT (its resolved path) and stage, so a rerun finds what an earlier
    one queued; free of the commas that `squeue --name` splits on."""
    where = Path(out).resolve()
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:8]
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", where.name)[:32]
    return f"artscale-{label}-{digest}-{stage}"


def pack_sbatch_command(
    src: Path, shards: Path, pack_args: Sequence[str] = (), cpus_per_task: int = 0, placement: Placement = Placement()
) -> list[str]:
    """pack.sbatch SRC OUT [pack flags]: `artscale pack` with one decode process per CPU of the job."""
    cpus = [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    return ["sbatch", *cpus, *placement.options(), str(PACK_SCRIPT), str(src), str(shards), *pack_args]


def command_sbatch_command(
    args: Sequence[str], cpus_per_task: int = 0, placement: Placement = Placement()
) -> list[str]:
    """artscale.sbatch COMMAND [ARGS]: one artscale command as a job (the export, the report)."""
    cpus = [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    return ["sbatch", *cpus, *placement.options(), str(COMMAND_SCRIPT), *args]


def _fitted(opts: dict, script: Path, gpus_flag: str, dry_run: bool, cpus_name: str) -> tuple[dict, Placement]:
    """A stage's options fitted to the partition's nodes (as `artscale submit` fits them), and its placement."""
    opts = fit_submission(opts, script=script, gpus_flag=gpus_flag, dry_run=dry_run, cpus_name=cpus_name)
    return opts, Placement.take(opts)


def _value(args: Sequence[str], flag: str) -> str:
    """The value of `flag` in an argument list (`--size 64` or `--size=64`); '' when absent."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return ""


def _pack_finished(shards: Path, src: Path, size: int) -> bool:
    """A complete manifest of SRC at the training size (another one: pack runs, and refuses in its log)."""
    from artscale.data.manifest import read_manifest

    try:
        manifest = read_manifest(shards)
    except UserError:
        return False
    return manifest.get("source") == str(src) and manifest.get("image_size") == size


def pipeline_stages(
    src: str | Path,
    out: str | Path,
    *,
    config: str,
    overrides: Sequence[str] = (),
    pack_args: Sequence[str] = (),
    pack_cpus: int = 0,
    export_args: Sequence[str] = (),
    sample: int = 0,
    sample_args: Sequence[str] = (),
    generate: str | Path = "",
    generate_args: Sequence[str] = (),
    train: Mapping | None = None,
    arrays: Mapping | None = None,
    placement: Placement = Placement(),
    array_time: str = "",
    dry_run: bool = False,
) -> list[Stage]:
    """The stages of one pipeline in order, each with its sbatch line and what it waits for.

    `train`: submit train's flags (nodes, gpus_per_node, cpu_processes, cpus_per_task, cpus_per_gpu,
    signal_seconds); `arrays`: those of the sample and generate arrays (tasks, max_running, gpus_per_task,
    cpus_per_task, cpus_per_gpu). `placement`'s time limit is training's; `array_time` the arrays' tasks'.
    Everything a stage would refuse at run time that can be known now is refused now (a UserError).
    """
    from artscale.train.config import load_config

    src, lay = Path(src).resolve(), Layout(Path(out).resolve())
    if not src.is_dir():
        raise UserError(f"SRC {src} is not a folder (an image folder with one subfolder per class)")
    if lay.out.exists() and not lay.out.is_dir():
        raise UserError(f"--out {lay.out} is a file: give a folder")
    if lay.shards.is_relative_to(src):
        raise UserError(f"--out {lay.out} lies inside SRC {src}: its shards would be packed as images; pick another")
    taken = sorted({o.split("=", 1)[0] for o in overrides} & {"data", "run_dir"})
    if taken:
        raise UserError(f"{', '.join(taken)}: the pipeline sets them (data={lay.shards}, run_dir={lay.run})")
    if Path(config).is_file():
        config = str(Path(config).resolve())
    train_args = ["--config", config, *overrides, f"data={lay.shards}", f"run_dir={lay.run}"]
    cfg = load_config(config, train_args[2:])  # a typo fails now, not after hours in the queue
    size = _value(pack_args, "--size")
    if size and int(size) != cfg.image_size:
        raise UserError(
            f"--size {size} but the training config's image_size is {cfg.image_size}: give image_size={size}"
        )
    if not size:  # pack at the size training reads
        pack_args = ["--size", str(cfg.image_size), *pack_args]
    if sample < 0:
        raise UserError(f"--sample {sample}: give a count of images (per class) > 0")
    if sample and cfg.objective != "diffusion":
        raise UserError(f"--sample draws from a diffusion model; this config trains objective={cfg.objective}")
    in_dir = Path(generate).resolve() if generate else None
    if in_dir is not None and not in_dir.is_dir():
        raise UserError(f"--generate {generate}: not a folder")
    if in_dir is not None and (in_dir == lay.generated or lay.generated in in_dir.parents):
        raise UserError(f"--generate {generate} is inside {lay.generated}, where its outputs go")

    train_opts = {**(train or {}), "partition": placement.partition, "account": placement.account}
    train_opts, train_place = _fitted(
        {**train_opts, "time_limit": placement.time_limit, "sbatch_args": placement.sbatch_args},
        SBATCH_DIR / "train.sbatch",
        "--gpus-per-node",
        dry_run,
        "--cpus-per-task",
    )
    untimed = {"partition": placement.partition, "account": placement.account, "sbatch_args": placement.sbatch_args}
    pack = {**untimed, "cpus_per_task": pack_cpus}
    pack_opts, pack_place = _fitted(pack, PACK_SCRIPT, "--gpus-per-task", dry_run, "--pack-cpus")
    cmd_opts, cmd_place = _fitted({**untimed, "cpus_per_task": 0}, COMMAND_SCRIPT, "--gpus-per-task", dry_run, "")

    def command(args: Sequence[str]) -> list[str]:
        return command_sbatch_command(args, cmd_opts["cpus_per_task"], cmd_place)

    stages = [
        Stage(
            "pack",
            pack_sbatch_command(src, lay.shards, pack_args, pack_opts["cpus_per_task"], pack_place),
            (),
            lambda: _pack_finished(lay.shards, src, cfg.image_size),
            f"{lay.shards / 'manifest.json'} of {src} at {cfg.image_size} px",
        ),
        Stage(
            "train",
            train_sbatch_command(train_args, **train_opts, placement=train_place),
            ("pack",),
            lambda: run_finished(train_args),
            str(lay.run / "final"),
        ),
        Stage(
            "export",
            command(["export", str(lay.run), str(lay.model), *export_args]),
            ("train",),
            lay.model.is_file,
            str(lay.model),
        ),
    ]
    outputs: list[Path] = []
    array_opts, array_place = dict(arrays or {}), Placement()
    if sample or in_dir is not None:
        array_opts, array_place = _fitted(
            {**(arrays or {}), **untimed, "time_limit": array_time},
            SBATCH_DIR / "generate.sbatch",
            "--gpus-per-task",
            dry_run,
            "--array-cpus-per-task",
        )
    for what, where, extra in (("sample", lay.samples, sample_args), ("generate", lay.generated, generate_args)):
        if (what == "sample" and not sample) or (what == "generate" and in_dir is None):
            continue
        more = {"count": sample} if what == "sample" else {"in_dir": str(in_dir)}
        lines = array_sbatch_commands(
            what, str(lay.model), str(where), **array_opts, **more, script_args=extra, placement=array_place
        )
        # the builder's own names and `afterok:{listing}` / `{array}`: the pipeline names each job and says what it waits for
        lines = [[a for a in line if not a.startswith(("--dependency=afterok:{", "--job-name="))] for line in lines]
        names = [f"{what}-list", what, f"{what}-merge"][-len(lines) :]
        done = where / "report.json"
        for name, line, after in zip(names, lines, [("export",), *([n] for n in names[:-1])]):
            stages.append(Stage(name, line, tuple(after), done.is_file, str(done), array=name == what))
        outputs.append(where)
    merges = tuple(s.name for s in stages if s.name.endswith("-merge"))
    stages.append(
        Stage(
            "report",
            command(["report", str(lay.run), *map(str, outputs), "--out", str(lay.report)]),
            merges or ("export",),
            (lay.report / "index.html").is_file,
            str(lay.report / "index.html"),
        )
    )
    return stages


def _user() -> str:
    """This user's name as SLURM knows it (from the uid; `squeue --me` needs Slurm 20.11)."""
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def queued_jobs(names: Sequence[str], dry_run: bool = False) -> dict[str, Job]:
    """This user's jobs that squeue still lists under `names`, by name ({} where there is no squeue).

    An array is one job: RUNNING while any task runs. Without an answer from squeue a submission
    cannot know what is queued, so it stops; a dry run says so and goes on."""
    if not shutil.which("squeue"):
        return {}
    cmd = ["squeue", "--noheader", f"--user={_user()}", f"--name={','.join(names)}", "--format=%j|%F|%T|%r"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
        said = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1] if out.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        said = str(e)
    if said:
        if not dry_run:
            raise UserError(f"squeue did not answer ({said}): cannot tell which stages are queued already")
        print(f"artscale: squeue did not answer ({said}): queued jobs not checked", file=sys.stderr)
        return {}
    found: dict[str, Job] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or parts[0] not in names:
            continue
        name, ident, state, reason = parts
        seen = found.get(name)
        if seen is None or (state == "RUNNING" and seen.id == ident):
            found[name] = Job(ident, state, reason)
    return found


def plan_steps(stages: Sequence[Stage], queued: Mapping[str, Job]) -> list[Step]:
    """What to do with each stage, given the jobs still queued (by stage name).

    A queued job is waited for, unless it is pending behind a failed or cancelled job (NEVER), or behind
    a stage submitted again now: then it is replaced. A stage is skipped when it finished and every stage
    before it did (otherwise its output is about to change); everything else is submitted."""
    ids: dict[str, str] = {}  # stage -> the job id to wait for, or "{stage}" when submitted in this run
    fresh: set[str] = set()
    steps = []
    for st in stages:
        job = queued.get(st.name)
        after = [ids[a] for a in st.after if a in ids]
        if job and not (job.pending and (job.reason == NEVER or any(a in fresh for a in st.after))):
            ids[st.name] = job.id
            steps.append(Step(st, "queued", job=job))
        elif not after and st.finished():
            steps.append(Step(st, "finished", replaces=job))
        else:
            ids[st.name] = "{" + st.name + "}"
            fresh.add(st.name)
            steps.append(Step(st, "submit", replaces=job, after=after))
    return steps


def _full_line(step: Step, out: Path, ids: Mapping[str, str]) -> list[str]:
    """The stage's line with the pipeline's options before its script: job name, log, dependency."""
    st = step.stage
    log = Layout(out).logs / (f"{st.name}-%A_%a.out" if st.array else f"{st.name}-%j.out")
    opts = [f"--job-name={job_name(out, st.name)}", f"--output={log}"]
    if step.after:
        waits = ":".join(ids.get(a, a) for a in step.after)
        opts += [f"--dependency=afterok:{waits}", "--kill-on-invalid-dep=no"]
    at = next(i for i, a in enumerate(st.line) if a.startswith(str(SBATCH_DIR)))
    return [*st.line[:at], *opts, *st.line[at:]]


def submit_pipeline(src: str | Path, out: str | Path, *, dry_run: bool = False, **opts) -> dict[str, str]:
    """Submit (or with dry_run print) what of the pipeline is not finished nor queued; returns stage -> job id
    of every stage that has a job now (submitted or found queued). `opts`: pipeline_stages's."""
    out = Path(out).resolve()
    stages = pipeline_stages(src, out, dry_run=dry_run, **opts)
    names = {job_name(out, s.name): s.name for s in stages}
    queued = {names[n]: job for n, job in queued_jobs(list(names), dry_run).items()}
    steps = plan_steps(stages, queued)
    ids: dict[str, str] = {}  # "{stage}" -> the id it got
    jobs: dict[str, str] = {}
    if not dry_run and any(s.action == "submit" for s in steps):
        if not shutil.which("sbatch"):
            raise UserError("sbatch not found: run this on a SLURM login node (or see the commands with --dry-run)")
        Layout(out).logs.mkdir(parents=True, exist_ok=True)  # before the jobs: SLURM does not create a log's folder
    for step in steps:
        name, old = step.stage.name, step.replaces
        if old is not None:
            if not dry_run:
                subprocess.run(["scancel", old.id], capture_output=True, text=True)
            print(
                f"# {name}: job {old.id} was left {old.state.lower()} ({old.reason}) behind a stage that did not "
                f"finish: {'would be ' if dry_run else ''}cancelled"
            )
        if step.action == "finished":
            print(f"# {name}: finished ({step.stage.mark}): not submitted")
        elif step.action == "queued":
            jobs[name] = step.job.id
            print(f"# {name}: already queued as job {step.job.id} ({step.job.state}): not submitted again")
        elif dry_run:
            print(shlex.join(_full_line(step, out, ids)))
        else:
            jobs[name] = ids["{" + name + "}"] = sbatch_parsable(_full_line(step, out, ids))
            waits = ", ".join(ids.get(a, a) for a in step.after)
            print(f"{name}: submitted job {jobs[name]}" + (f" (after {waits})" if waits else ""))
    if not dry_run:
        _say_how_to_follow(out, stages, jobs)
    return jobs


def _say_how_to_follow(out: Path, stages: Sequence[Stage], jobs: Mapping[str, str]) -> None:
    report = Layout(out).report / "index.html"
    if not jobs:
        print(f"nothing to submit: every stage has finished; the report: {report}")
        return
    names = ",".join(job_name(out, s.name) for s in stages)
    print(
        f"the report will be {report}; logs in {Layout(out).logs}\n"
        "a stage that fails leaves the ones after it pending (squeue's reason: DependencyNeverSatisfied, then Dependency).\n"
        f"  see them:   squeue --user={_user()} --name={names} --format='%.12i %.12T %.24r %j'\n"
        f"  clear them: scancel {' '.join(dict.fromkeys(jobs.values()))}\n"
        "or run this same command again: it submits only what has not finished, replacing the jobs left pending"
    )

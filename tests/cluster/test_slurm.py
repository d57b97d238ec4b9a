"""SLURM: the launch line as a pure function, the report merge, and the sbatch scripts on a real
local slurmd (slurm/local-cluster.sh). Training here uses vgg_weights=random: pretrained VGG
cannot be downloaded on these machines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artscale.cluster.slurm import (
    SBATCH_DIR,
    accelerate_launch_command,
    gpus_on_node,
    main_port,
    node_launch_command,
)
from artscale.core.errors import UserError
from artscale.infer.outputs import merge_reports

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parents[1]
NO_SLURM = {"PATH": str(VENV / "bin")}  # for run_cli: a machine without sinfo, where submit checks nothing


def test_auto_precision_is_decided_by_the_training_process_not_the_launcher():
    cmd, _ = accelerate_launch_command(
        num_machines=1, machine_rank=0, processes_per_machine=2, main_ip="x", main_port=1, mixed_precision="auto"
    )
    assert cmd[cmd.index("--mixed_precision") + 1] == "no"  # accelerate launch knows no `auto`


def test_launch_line_for_2_nodes_x_8_gpus():
    lines = [
        accelerate_launch_command(
            num_machines=2,
            machine_rank=rank,
            processes_per_machine=8,
            main_ip="gpu-node-017",
            main_port=29517,
            mixed_precision="bf16",
            script_args=["--config", "big.yaml", "max_steps=10"],
        )
        for rank in (0, 1)
    ]
    for rank, (cmd, env) in enumerate(lines):
        assert env == {}
        assert cmd == [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "16",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "gpu-node-017",
            "--main_process_port",
            "29517",
            "--rdzv_backend",
            "static",
            "--same_network",
            "--mixed_precision",
            "bf16",
            "--dynamo_backend",
            "no",
            "-m",
            "artscale.train",  # the module, so an installed artscale launches without a checkout
            "--config",
            "big.yaml",
            "max_steps=10",
        ]


def test_launch_line_single_gpu_and_cpu_ranks():
    cmd, env = accelerate_launch_command(
        num_machines=1, machine_rank=0, processes_per_machine=1, main_ip="x", main_port=1
    )
    assert (
        cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" not in cmd and "--machine_rank" not in cmd and env == {}
    )
    # accelerate 1.15: --cpu starts one process; CPU ranks are --multi_gpu with ACCELERATE_USE_CPU=1
    cmd, env = accelerate_launch_command(
        num_machines=2, machine_rank=1, processes_per_machine=1, main_ip="h", main_port=2, use_gpu=False
    )
    assert env == {"ACCELERATE_USE_CPU": "1"}
    assert "--cpu" not in cmd and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--machine_rank") + 1] == "1"
    cmd, env = accelerate_launch_command(
        num_machines=1, machine_rank=0, processes_per_machine=1, main_ip="h", main_port=2, use_gpu=False
    )
    assert "--cpu" in cmd and "--multi_gpu" not in cmd and env == {"ACCELERATE_USE_CPU": "1"}


def test_launch_line_refuses_bad_ranks():
    with pytest.raises(UserError, match="outside 0..1"):
        accelerate_launch_command(num_machines=2, machine_rank=2, processes_per_machine=8, main_ip="h", main_port=1)
    with pytest.raises(UserError, match="at least 1"):
        accelerate_launch_command(num_machines=0, machine_rank=0, processes_per_machine=8, main_ip="h", main_port=1)


def test_node_line_from_slurm_environment(tmp_path):
    """What each srun task builds from the variables SLURM gives it (here written out by hand)."""
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8"}
    args = [f"run_dir={tmp_path / 'run'}", "mixed_precision=bf16"]
    cmd, extra = node_launch_command(env, "gpu-node-017", args)
    assert Path(cmd[0]).name == "accelerate" and cmd[1] == "launch" and extra == {}
    assert cmd[cmd.index("--num_processes") + 1] == "16"
    assert cmd[cmd.index("--machine_rank") + 1] == "1"
    assert cmd[cmd.index("--main_process_ip") + 1] == "gpu-node-017"
    assert cmd[cmd.index("--main_process_port") + 1] == str(20000 + 4242)
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[-4:] == ["-m", "artscale.train", *args]
    cpu_env = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "ARTSCALE_CPU_PROCESSES": "2", "ARTSCALE_MAIN_PORT": "31000"}
    cmd, extra = node_launch_command(cpu_env, "h", [f"run_dir={tmp_path / 'run'}"])
    assert extra == {"ACCELERATE_USE_CPU": "1"} and cmd[cmd.index("--num_processes") + 1] == "2"
    with pytest.raises(UserError, match="unknown config key"):
        node_launch_command(env, "h", ["no_such_key=1"])


def test_gpu_count_and_port_defaults():
    assert gpus_on_node({"ARTSCALE_GPUS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "8"}) == 4
    assert gpus_on_node({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert gpus_on_node({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert gpus_on_node({}) == 0
    assert main_port({"SLURM_JOB_ID": "123"}) == 20123 != main_port({"SLURM_JOB_ID": "124"})
    assert main_port({"ARTSCALE_MAIN_PORT": "29500", "SLURM_JOB_ID": "123"}) == 29500


def test_run_finished_only_when_final_is_newest(tmp_path):
    """The requeue check: final/ at least as new as the newest checkpoint (a real dir layout, by hand)."""
    from artscale.cluster.slurm import run_finished

    run = tmp_path / "run"
    args = [f"run_dir={run}"]
    assert not run_finished(args)
    for step in (5, 10):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    assert not run_finished(args)  # preempted at step 10: requeue
    (run / "final").mkdir()
    (run / "final" / "trainer_state.json").write_text(json.dumps({"step": 10}))
    assert run_finished(args)  # reached its last step: never requeue
    (run / "checkpoints" / "step-000015").mkdir()
    (run / "checkpoints" / "step-000015" / "trainer_state.json").write_text(json.dumps({"step": 15}))
    assert not run_finished(args)  # extended past an earlier finish, then preempted


def test_submit_dry_run_prints_the_sbatch_lines(tmp_path, run_cli):
    out = run_cli(
        "submit",
        "train",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--time",
        "24:00:00",
        "--partition",
        "gpu",
        "--sbatch-arg=--qos=high",
        "--dry-run",
        f"run_dir={tmp_path / 'run'}",
        "mixed_precision=bf16",
        env=NO_SLURM,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr  # no sinfo: nothing checked, nothing said
    assert out.stdout.split() == [
        "sbatch",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",  # 8 cores per GPU: one task per node runs its 8 ranks and their loaders
        "--signal=B:USR1@300",
        "--time=24:00:00",
        "--partition=gpu",
        "--qos=high",
        str(SBATCH_DIR / "train.sbatch"),
        f"run_dir={tmp_path / 'run'}",
        "mixed_precision=bf16",
    ]
    out = run_cli(
        "submit",
        "generate",
        "m.onnx",
        "in",
        "out",
        "--tasks",
        "100",
        "--max-running",
        "20",
        "--gpus-per-task",
        "1",
        "--generate-args",
        "--batch-size 64",
        "--dry-run",
        env=NO_SLURM,
    )
    assert out.returncode == 0, out.stderr
    listing, array, merge = out.stdout.splitlines()
    generate_args = ["m.onnx", "in", "out", "--device", "cuda", "--batch-size", "64"]
    # first one walk of the tree (the listing job), then the array after it, then the merge
    assert listing.split() == ["sbatch", str(SBATCH_DIR / "generate-list.sbatch"), *generate_args]
    assert array.split() == [
        "sbatch",
        "'--dependency=afterok:{listing}'",
        "--array=0-99%20",
        "--gpus-per-task=1",
        "--cpus-per-task=8",
        str(SBATCH_DIR / "generate.sbatch"),
        *generate_args,
    ]
    assert merge.split() == [
        "sbatch",
        "'--dependency=afterok:{array}'",
        str(SBATCH_DIR / "generate-merge.sbatch"),
        "out",
        "100",
    ]
    fewer = run_cli("submit", "train", "--gpus-per-node", "4", "--cpus-per-gpu", "6", "--dry-run", env=NO_SLURM)
    assert fewer.returncode == 0 and "--cpus-per-task=24" in fewer.stdout.split(), fewer.stderr
    cpu = run_cli("submit", "generate", "m.onnx", "in", "out", "--tasks", "2", "--dry-run", env=NO_SLURM)
    assert "--cpus-per-task" not in cpu.stdout  # no GPU: the script's own default
    # srun gets the task's cores explicitly (newer Slurm does not pass sbatch's on), NCCL says only warnings
    train_script = (SBATCH_DIR / "train.sbatch").read_text()
    assert 'srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK' in train_script
    for script in ("train.sbatch", "generate.sbatch"):
        assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in (SBATCH_DIR / script).read_text()
    bad = run_cli("submit", "train", "--dry-run", "no_such_key=1", env=NO_SLURM)
    assert bad.returncode == 2 and "unknown config key no_such_key" in bad.stderr and bad.stdout == ""
    bad = run_cli("submit", "generate", "m.onnx", "in", "out", "--tasks", "0", "--dry-run", env=NO_SLURM)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--tasks 0" in bad.stderr


# --- on a real SLURM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, run_cli) -> Path:
    """A random-weight model exported through the CLI, the way an article .pth is exported."""
    import torch

    from artscale.models.article import ConvDiffusionModel

    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    torch.save(ConvDiffusionModel().state_dict(), d / "article.pth")
    out = run_cli("export", d / "article.pth", d / "tiny.onnx", "--size", "16")
    assert out.returncode == 0, out.stderr
    return d / "tiny.onnx"


@pytest.fixture(scope="session")
def make_tree(make_image):
    """A tree of images to generate from, with a broken image and a text file."""

    def make(root: Path) -> Path:
        for i in range(7):
            make_image(root / ("a" if i % 2 else "b/c") / f"img {i}.jpg", (16 + 8 * (i % 3), 24), seed=i)
        make_image(root / "b" / "x.png", (20, 20), seed=10)
        make_image(root / "b" / "x.jpg", (20, 20), seed=11)
        (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (root / "a" / "notes.txt").write_text("not an image")
        return root

    return make


@pytest.mark.slow
def test_merge_accounts_for_every_input_without_slurm(tiny_onnx, tmp_path, run_cli, make_image, make_tree):
    """The merge logic on real shard reports from `artscale generate --num-shards 3 --shard-index I`."""
    tree, out = make_tree(tmp_path / "in"), tmp_path / "out"
    for i in range(3):
        done = run_cli(
            "generate",
            tiny_onnx,
            tree,
            out,
            "--num-shards",
            "3",
            "--shard-index",
            str(i),
            "--workers",
            "1",
            "--device",
            "cpu",
        )
        assert done.returncode == 0, done.stderr
    with pytest.raises(UserError, match="shard 0 of 4 did not finish"):
        merge_reports(out, 4)
    merged = merge_reports(out, 3)
    assert (merged["inputs_seen"], merged["written"], merged["skipped"] + merged["ignored"]) == (11, 9, 2)
    assert sum(s["inputs_seen"] for s in merged["shards"]) == 11
    victim = next((out / "a").glob("*.png"))
    victim.unlink()
    with pytest.raises(UserError, match="1 outputs are missing"):
        merge_reports(out, 3)
    make_image(tree / "a" / "late arrival.jpg", (16, 16), seed=99)  # the tree changed after the shards ran
    with pytest.raises(UserError, match="holds"):
        merge_reports(out, 3)
    (tree / "a" / "late arrival.jpg").unlink()
    report = out / "report-2-of-3.json"
    data = json.loads(report.read_text())
    report.write_text(json.dumps({**data, "written": data["written"] - 1}))
    with pytest.raises(UserError, match="inputs but"):
        merge_reports(out, 3)
    report.unlink()
    with pytest.raises(UserError, match="shard 2 of 3 did not finish"):
        merge_reports(out, 3)
    merged_cli = subprocess.run(
        [sys.executable, "-m", "artscale.cluster", "merge", str(out), "--num-shards", "3"],
        capture_output=True,
        text=True,
    )
    assert merged_cli.returncode == 2 and merged_cli.stderr.count("\n") == 1 and "did not finish" in merged_cli.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_generation_array_and_merge_equal_one_run(
    slurm, tiny_onnx, tmp_path, run_cli, make_tree, wait_job, tree_files, sbatch
):
    tree = make_tree(tmp_path / "in")
    one = run_cli(
        "generate", tiny_onnx, tree, tmp_path / "one", "--batch-size", "1", "--workers", "1", "--device", "cpu"
    )
    assert one.returncode == 0, one.stderr
    reference = json.loads((tmp_path / "one" / "report.json").read_text())

    submitted = run_cli(
        "submit",
        "generate",
        tiny_onnx,
        tree,
        tmp_path / "out",
        "--tasks",
        "3",
        "--cpus-per-task",
        "1",
        "--generate-args",
        "--batch-size 1 --workers 1 --device cpu",
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    listing, array, merge = re.search(
        r"listing job (\d+), then generation array (\d+) \(3 tasks\), then merge job (\d+)", submitted.stdout
    ).groups()
    tasks = wait_job(array, 180)
    assert sorted(r["JobState"] for r in tasks) == ["COMPLETED"] * 3, [
        p.read_text() for p in tmp_path.glob("slurm-*.out")
    ]
    [merged_job] = wait_job(merge, 60)
    merge_log = (tmp_path / f"slurm-artscale-generate-merge-{merge}.out").read_text()
    assert merged_job["JobState"] == "COMPLETED", merge_log
    assert "merged 3 reports" in merge_log

    # the listing job walked the tree once; every task read its listing instead of walking
    assert (tmp_path / "out" / "listing.jsonl").is_file()
    task_logs = [p.read_text() for p in tmp_path.glob(f"slurm-artscale-generate-{array}_*.out")]
    assert len(task_logs) == 3 and all("reading the listing" in log for log in task_logs)
    assert tree_files(tmp_path / "out") == tree_files(tmp_path / "one") | {
        "listing.jsonl": (tmp_path / "out" / "listing.jsonl").read_bytes()
    }
    assert sorted(p.name for p in (tmp_path / "out").glob("report*.json")) == [
        "report-0-of-3.json",
        "report-1-of-3.json",
        "report-2-of-3.json",
        "report.json",
    ]
    merged = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("inputs_seen", "written", "skipped", "ignored", "skipped_files"):
        assert merged[key] == reference[key], key
    assert merged["inputs_seen"] == 11 and merged["written"] == 9 and merged["already_done"] == 0
    assert "a/broken.jpg" in {s["path"] for s in merged["skipped_files"]} and merged["skipped"] + merged["ignored"] == 2
    assert [s["shard_index"] for s in merged["shards"]] == [0, 1, 2]

    # a merge job that cannot account for everything fails the job
    (tmp_path / "out" / "report-1-of-3.json").unlink()
    failed = sbatch(
        "--output=merge-fail.log", SBATCH_DIR / "generate-merge.sbatch", tmp_path / "out", "3", cwd=tmp_path
    )
    [record] = wait_job(failed, 60)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0"
    assert "did not finish" in (tmp_path / "merge-fail.log").read_text()


@pytest.fixture(scope="module")
def tiny_shards(image_folder, tmp_path_factory, run_cli) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tiny"
    packed = run_cli("pack", image_folder, out, "--size", "16", "--val-fraction", "0.2", "--workers", "1")
    assert packed.returncode == 0, packed.stderr
    return out


@pytest.fixture(scope="session")
def train_args(tiny):
    """A tiny CPU run (16 px, batch 4, random VGG weights: pretrained ones cannot be downloaded here)."""

    def args(shards: Path, run_dir: Path, max_steps: int) -> list[str]:
        return tiny(run_dir, shards, f"max_steps={max_steps}", "pg_timeout_s=60")

    return args


# one host plays 2 machines: 2 srun tasks, machine_rank 0 and 1, one CPU rank each (gloo)
TWO_MACHINES = ("--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1")


@pytest.mark.slurm
@pytest.mark.slow
def test_train_sbatch_two_machines_reach_last_step(slurm, tiny_shards, tmp_path, train_args, sbatch, wait_job):
    job = sbatch(
        *TWO_MACHINES,
        "--output=train.log",
        SBATCH_DIR / "train.sbatch",
        *train_args(tiny_shards, tmp_path / "run", 3),
        cwd=tmp_path,
    )
    [record] = wait_job(job, 240)
    log = (tmp_path / "train.log").read_text()
    assert record["JobState"] == "COMPLETED", log
    assert "--machine_rank 0" in log and "--machine_rank 1" in log and "--num_processes 2" in log
    assert log.count(" -m artscale.train ") == 2  # each machine launches the module: no checkout needed
    assert log.count("world size 2,") == 2  # each machine's local main process says so
    assert json.loads((tmp_path / "run" / "final" / "trainer_state.json").read_text())["step"] == 3
    assert record["Restarts"] == "0"


@pytest.fixture(scope="session")
def usr1_then_resumed(wait_job):
    """Send the batch script USR1 (what --signal=B:USR1@N does near the time limit) and check the job:
    each machine's rank saved and stopped at one step k by itself, none was killed by the signal
    (srun: "User defined signal", torch: "Signal 10 (SIGUSR1)"), one requeue, resumed from k.
    Returns (the log, k)."""

    def check(job: str, log_path: Path, max_steps: int) -> tuple[str, int]:
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        [record] = wait_job(job, 300)
        log = log_path.read_text()
        assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log
        stopped = sorted({int(s) for s in re.findall(r"stopped by a signal at step (\d+)", log)})
        assert len(stopped) == 1 and 0 < stopped[0] < max_steps, log
        k = stopped[0]
        assert log.count(f"stopped by a signal at step {k}:") == 2, log
        assert "(SIGUSR1)" not in log and "User defined signal" not in log, log
        assert f"resumed from step {k} (" in log and f"step-{k:06d})" in log, log
        return log, k

    return check


@pytest.mark.slurm
@pytest.mark.slow
def test_train_sbatch_usr1_checkpoints_requeues_and_resumes(
    slurm, tiny_shards, tmp_path, train_args, sbatch, job_info, usr1_then_resumed
):
    max_steps = 20
    args = train_args(tiny_shards, tmp_path / "run", max_steps)
    log_path = tmp_path / "train.log"
    job = sbatch(*TWO_MACHINES, f"--output={log_path.name}", SBATCH_DIR / "train.sbatch", *args, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while "artscale: machine 1:" not in (log_path.read_text() if log_path.exists() else ""):
        assert time.monotonic() < deadline, f"training did not start: {job_info(job)}"
        time.sleep(0.5)
    # It comes while the ranks are still starting: they must get it once their handler is in place.
    log, k = usr1_then_resumed(job, log_path, max_steps)
    assert log.count("SIGUSR1 -> training ranks [") == 2  # both machines passed it to their rank
    assert log.index("requeueing job") < log.index(f"resumed from step {k}")
    assert log.count(f"artscale: job {job} start") == 2 and f"artscale: job {job} start 2" in log
    assert json.loads((tmp_path / "run" / "final" / "trainer_state.json").read_text())["step"] == max_steps
    # it finished: it is not requeued again, and the requeue check agrees
    time.sleep(3)
    [record] = job_info(job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1"
    finished = subprocess.run(
        [sys.executable, "-m", "artscale.cluster", "finished", *args], capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_train_sbatch_usr1_while_python_starts_waits_for_the_handler(
    slurm, tiny_shards, tmp_path, train_args, sbatch, job_info, usr1_then_resumed
):
    """A USR1 that comes before the node process has its handler (here: while its Python starts, made
    slow by a sitecustomize) is held for it, not fatal: the ranks checkpoint and the job requeues."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.pop('ARTSCALE_TEST_SLOW_START', ''):  # this process only, not its children\n"
        "    open(os.environ['ARTSCALE_TEST_STARTING'] + str(os.getpid()), 'w').close()\n"
        "    time.sleep(4)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")])),
        "ARTSCALE_TEST_SLOW_START": "1",
        "ARTSCALE_TEST_STARTING": str(tmp_path / "starting-"),
    }
    max_steps = 20
    args = train_args(tiny_shards, tmp_path / "run", max_steps)
    log_path = tmp_path / "train.log"
    job = sbatch(*TWO_MACHINES, f"--output={log_path.name}", SBATCH_DIR / "train.sbatch", *args, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("starting-*"))) < 2:  # both machines' node processes are inside Python's start
        assert time.monotonic() < deadline, f"the node processes did not start: {job_info(job)}"
        time.sleep(0.1)
    usr1_then_resumed(job, log_path, max_steps)
    assert json.loads((tmp_path / "run" / "final" / "trainer_state.json").read_text())["step"] == max_steps


@pytest.mark.slurm
@pytest.mark.slow
def test_pack_sbatch_packs_what_pack_packs(slurm, image_folder, tmp_path, run_cli, sbatch, wait_job):
    job = sbatch(
        "--cpus-per-task=1",
        "--output=pack.log",
        SBATCH_DIR / "pack.sbatch",
        image_folder,
        tmp_path / "shards",
        "--size",
        "16",
        cwd=tmp_path,
    )
    [record] = wait_job(job, 120)
    log = (tmp_path / "pack.log").read_text()
    assert record["JobState"] == "COMPLETED", log
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["image_size"] == 16 and "packed 40 of" in log
    verified = run_cli("verify", tmp_path / "shards")
    assert verified.returncode == 0, verified.stderr


RANK = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGUSR1, lambda *_: (Path(sys.argv[1]).write_text("stop"), sys.exit(0)))
time.sleep(4)
sys.exit(1)
"""


def _stops_dying_of(pid: int, signum: int) -> bool:
    """Does process pid ignore, block or catch signum (/proc/PID/status)?"""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return bool(sum(int(fields[k], 16) for k in ("SigIgn", "SigBlk", "SigCgt")) >> (signum - 1) & 1)


def test_relay_keeps_a_usr1_that_comes_while_the_launcher_starts(tmp_path):
    """USR1 sent the moment the relay stops dying of it (ignored, blocked or caught), maybe before the
    launcher (a shell standing in for `accelerate launch`) has even started: the rank must still get
    it. The moment is a race, so it is run a few times (a lost signal shows in most of them)."""
    (tmp_path / "rank.py").write_text(RANK)
    code = "import os, sys; from artscale.cluster.slurm import relay; sys.exit(relay(sys.argv[1:], os.environ))"
    for attempt in range(4):
        got = tmp_path / f"got-{attempt}"
        launcher = ["sh", "-c", f"{sys.executable} {tmp_path / 'rank.py'} {got}; exit $?"]
        proc = subprocess.Popen([sys.executable, "-c", code, *launcher], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not _stops_dying_of(proc.pid, signal.SIGUSR1):
            assert time.monotonic() < deadline and proc.poll() is None
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=30) == 0 and got.read_text() == "stop", f"attempt {attempt}: USR1 lost"
        assert "SIGUSR1 -> training ranks" in proc.stdout.read()


def test_first_host_and_a_broken_report_are_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir), "SLURM_JOB_NODELIST": "node[01-02]"}
    env.pop("ARTSCALE_MAIN_ADDR", None)
    node = [sys.executable, "-m", "artscale.cluster", "node", f"run_dir={tmp_path / 'run'}"]
    missing = subprocess.run(node, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "cannot run scontrol" in missing.stderr and "ARTSCALE_MAIN_ADDR" in missing.stderr
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\necho 'scontrol: error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    (bin_dir / "scontrol").chmod(0o755)
    failing = subprocess.run(node, env=env, capture_output=True, text=True)
    assert failing.returncode == 2 and failing.stderr.count("\n") == 1, failing.stderr
    assert "Unable to contact slurm controller" in failing.stderr
    out = tmp_path / "out"
    out.mkdir()
    (out / "report-0-of-2.json").write_text('{"shard_index": 0, "num_shards": 2, "writ')
    merged = subprocess.run(
        [sys.executable, "-m", "artscale.cluster", "merge", str(out), "--num-shards", "2"],
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 2 and merged.stderr.count("\n") == 1, merged.stderr
    assert "report-0-of-2.json is not a readable JSON report" in merged.stderr


def test_a_corrupt_or_missing_generate_shard_report_is_one_counted_line(tmp_path):
    """Every unusable shard report is named in the merge's one line; no report.json is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report-0-of-5.json").write_bytes(b"\xff\xfe not UTF-8")
    (out / "report-1-of-5.json").write_text("[1, 2]")
    counts = dict.fromkeys(("inputs_seen", "written", "already_done", "skipped", "ignored"), 0)
    good = {**counts, "in_dir": str(tmp_path), "format": "png", "skipped_files": [], "num_shards": 5}
    (out / "report-3-of-5.json").write_text(json.dumps({**good, "shard_index": 4}))
    (out / "report-4-of-5.json").write_text(json.dumps({**good, "shard_index": 4}))
    with pytest.raises(UserError) as caught:
        merge_reports(out, 5)
    said = str(caught.value)
    assert said.startswith("4 of 5 shard reports unusable: ") and said.endswith("; 1 more; run shards 0-3 again")
    assert f"{out / 'report-0-of-5.json'} is not a readable JSON report" in said
    assert "report-1-of-5.json is not a generation report (not a JSON object)" in said
    assert "report-2-of-5.json is missing: shard 2 of 5 did not finish" in said
    assert "\n" not in said and not (out / "report.json").exists()


def test_ci_fails_instead_of_skipping_without_slurm(tmp_path):
    """With CI=true and no sbatch on PATH, a test marked slurm fails: a green CI means they ran."""
    env = {**os.environ, "CI": "true", "PATH": str(tmp_path)}
    env.pop("SLURM_CONF", None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{__file__}::test_pack_sbatch_packs_what_pack_packs",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "1 error" in run.stdout and "CI=true but sbatch is not installed" in run.stdout, (
        run.stdout[-2000:]
    )


@pytest.mark.parametrize("module", ["artscale.cluster", "artscale.slurm"])
def test_the_node_entry_answers_under_its_name_and_the_name_older_scripts_ran(module):
    """A job queued with an sbatch script from before the layout runs `python -m artscale.slurm` after an upgrade."""
    r = subprocess.run([sys.executable, "-m", module, "finished", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m artscale.cluster finished"), r.stderr


def test_the_node_entry_takes_training_arguments_that_start_with_config(tmp_path):
    """`submit train --config X` on a cluster: train.sbatch runs `python -m artscale.cluster node|finished
    --config X key=value`, all of it training's (argparse's REMAINDER alone refused the leading flag)."""
    args = ["--config", "diffusion-cpu", f"run_dir={tmp_path / 'run'}"]
    r = subprocess.run([sys.executable, "-m", "artscale.cluster", "finished", *args], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == "", r.stderr  # not finished: no final/ yet

"""`artscale submit sample`: the sbatch lines, and on a real SLURM (the local cluster) a 3-task array
plus its merge giving exactly the files of one run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from artscale.cluster.slurm import SBATCH_DIR
from artscale.export.article import export_onnx

NO_SLURM = {"PATH": str(Path(sys.executable).parent)}  # for run_cli: a machine without sinfo

ARGS = "--class impressionism --steps 3 --batch-size 2 --device cpu"


def test_submit_sample_dry_run_prints_the_array_and_the_merge(run_cli):
    args = ("submit", "sample", "m.onnx", "out", "--count", "9", "--tasks", "3", "--dry-run", "--sample-args", ARGS)
    out = run_cli(*args, env=NO_SLURM)  # no sinfo here: nothing checked, nothing said
    assert out.returncode == 0 and out.stderr == "", out.stderr
    array, merge = out.stdout.splitlines()
    assert array.startswith("sbatch --array=0-2 --job-name=artscale-sample ")
    assert array.endswith(f"{SBATCH_DIR / 'generate.sbatch'} sample m.onnx out --count 9 {ARGS}")
    assert merge.endswith(f"{SBATCH_DIR / 'generate-merge.sbatch'} out 3 --sample")


def node_cpus() -> int:
    """CPUs of the local cluster's one node."""
    out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.mark.slurm
def test_submit_fits_or_refuses_on_the_local_cluster(slurm, tmp_path, run_cli):
    """Nothing is submitted: each request is fitted or refused against what sinfo says of the node."""
    cpus = node_cpus()
    sample = ("submit", "sample", "m.onnx", tmp_path / "out", "--count", "9", "--tasks", "3")
    dry = run_cli(*sample, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    array = dry.stdout.splitlines()[0].split()
    if cpus < 4:  # generate.sbatch's default, lowered to the node
        assert f"--cpus-per-task={cpus}" in array and dry.stderr == (
            f"artscale: no node of partition local has more than {cpus} CPUs: asking for --cpus-per-task={cpus} "
            "instead of the default 4 (--cpus-per-task to choose)\n"
        )
    else:
        assert not any(a.startswith("--cpus-per-task") for a in array) and dry.stderr == ""
    asked = max(4, cpus + 1)
    refused = run_cli(*sample, "--cpus-per-task", asked, cwd=tmp_path)
    assert (
        refused.returncode == 2
        and refused.stdout == ""
        and refused.stderr
        == (
            f"artscale: error: --cpus-per-task {asked}: no node of partition local has more than {cpus} CPUs; "
            f"pass --cpus-per-task {cpus} or less\n"
        )
    )
    gpu = run_cli(*sample, "--gpus-per-task", "1", cwd=tmp_path)
    assert gpu.returncode == 2 and "--gpus-per-task 1: no node of partition local has a GPU" in gpu.stderr
    # a partition this cluster lacks: refused when submitting, only said with --dry-run (lines for elsewhere)
    other = run_cli(*sample, "--partition", "gpu", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr == (
        "artscale: error: partition gpu is not on this cluster (sinfo lists local); pass --partition with one of them\n"
    )
    other = run_cli(*sample, "--partition", "gpu", "--dry-run")
    assert other.returncode == 0 and "--partition=gpu" in other.stdout and "not checked" in other.stderr
    assert not list(tmp_path.glob("slurm-*")) and not (tmp_path / "out").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_sampling_array_and_merge_equal_one_run(
    slurm, tmp_path, make_diffusion_run, run_cli, sbatch, wait_job, tree_files
):
    model = tmp_path / "m.onnx"
    export_onnx(make_diffusion_run(tmp_path / "run"), model)
    one = run_cli("sample", model, tmp_path / "one", "--count", "9", *ARGS.split())
    assert one.returncode == 0, one.stderr
    submitted = run_cli(
        "submit",
        "sample",
        model,
        tmp_path / "out",
        "--count",
        "9",
        "--tasks",
        "3",
        "--sample-args",
        ARGS,
        cwd=tmp_path,
    )
    # No --cpus-per-task: generate.sbatch's 4 would pend for good on a smaller node; it is fitted instead.
    assert submitted.returncode == 0, submitted.stderr
    fitted = node_cpus() < 4
    assert ("instead of the default 4" in submitted.stderr) == fitted, submitted.stderr
    array, merge = re.search(r"sampling array (\d+) \(3 tasks\), then merge job (\d+)", submitted.stdout).groups()
    tasks = wait_job(array, 180)
    assert sorted(r["JobState"] for r in tasks) == ["COMPLETED"] * 3, [p.read_text() for p in tmp_path.glob("slurm-*")]
    [merged_job] = wait_job(merge, 60)
    log = (tmp_path / f"slurm-artscale-sample-merge-{merge}.out").read_text()
    assert merged_job["JobState"] == "COMPLETED" and "merged 3 reports: 9 images" in log, log
    assert tree_files(tmp_path / "out") == tree_files(tmp_path / "one") and len(tree_files(tmp_path / "one")) == 9
    merged = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (merged["written"], merged["num_shards"], merged["images_in_run"]) == (9, 3, 9)

    (tmp_path / "out" / "00000004.png").unlink()  # a merge that cannot find every index fails its job
    failed = sbatch(
        "--output=merge-fail.log",
        SBATCH_DIR / "generate-merge.sbatch",
        tmp_path / "out",
        "3",
        "--sample",
        cwd=tmp_path,
    )
    [record] = wait_job(failed, 60)
    assert record["JobState"] == "FAILED" and "00000004.png" in (tmp_path / "merge-fail.log").read_text()

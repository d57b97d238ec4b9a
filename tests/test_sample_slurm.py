"""`artscale submit sample`: the sbatch lines, and on a real SLURM (the local cluster) a 3-task array
plus its merge giving exactly the files of one run."""

from __future__ import annotations

import json
import re

import pytest
from _diffusion_helpers import make_diffusion_run
from conftest import ROOT, run_cli
from test_slurm import sbatch, slurm, tree_files, wait_job  # noqa: F401  (slurm: the fixture)

from artscale.export import export_onnx

ARGS = "--class impressionism --steps 3 --batch-size 2 --device cpu"


def test_submit_sample_dry_run_prints_the_array_and_the_merge():
    out = run_cli(
        "submit", "sample", "m.onnx", "out", "--count", "9", "--tasks", "3", "--dry-run", "--sample-args", ARGS
    )
    assert out.returncode == 0, out.stderr
    array, merge = out.stdout.splitlines()
    assert array.startswith("sbatch --array=0-2 --job-name=artscale-sample ")
    assert array.endswith(f"slurm/generate.sbatch sample m.onnx out --count 9 {ARGS}")
    assert merge.endswith("slurm/generate-merge.sbatch out 3 --sample")


@pytest.mark.slurm
@pytest.mark.slow
def test_sampling_array_and_merge_equal_one_run(slurm, tmp_path):  # noqa: F811
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
        "--cpus-per-task",
        "1",
        "--sample-args",
        ARGS,
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
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
        ROOT / "slurm" / "generate-merge.sbatch",
        tmp_path / "out",
        "3",
        "--sample",
        cwd=tmp_path,
    )
    [record] = wait_job(failed, 60)
    assert record["JobState"] == "FAILED" and "00000004.png" in (tmp_path / "merge-fail.log").read_text()

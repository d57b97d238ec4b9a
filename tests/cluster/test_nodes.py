"""A submission checked and fitted against the partition's nodes: the pure functions on sinfo
texts of several cluster shapes, and `artscale submit --dry-run` against a stand-in sinfo that
prints such a text (the real local cluster is in test_sample_slurm.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from artscale.cluster.nodes import fit_request, gres_gpus, parse_mem_mb, parse_sinfo, script_cpus
from artscale.cluster.slurm import SBATCH_DIR
from artscale.core.errors import UserError

VENV_BIN = Path(sys.executable).parent

# `sinfo --noheader --Node --all --format=%P|%N|%c|%m|%G` on a cluster with CPU, GPU and debug partitions
CLUSTER = """\
cpu*|c01|64|256000|(null)
cpu*|c02|64|256000|(null)
gpu|g01|32|512000|gpu:a100:4(S:0-1)
gpu|g02|32|512000|gpu:a100:4(S:0-1)
gpu|g03|96|1024000|gpu:8,mps:800
debug|d01|2|8000|(null)
"""
LOCAL = "local*|vm|2|24105|(null)\n"  # slurm/local-cluster.sh on a 2-core machine


def test_gpus_from_gres():
    assert gres_gpus("gpu:8") == 8
    assert gres_gpus("gpu:a100:4(S:0-1)") == 4
    assert gres_gpus("(null)") == 0
    assert gres_gpus("mps:400,gpu:h100:8(S:0,1)") == 8  # the socket list's comma is not a new GRES
    assert gres_gpus("gpu:a100:2,gpu:v100:2") == 4
    assert gres_gpus("gpu:a100") == 1


def test_partition_asked_for_or_the_default_one():
    cpu = parse_sinfo(CLUSTER)
    assert cpu.name == "cpu" and [(n.name, n.cpus, n.gpus, n.mem_mb) for n in cpu.nodes] == [
        ("c01", 64, 0, 256000),
        ("c02", 64, 0, 256000),
    ]
    gpu = parse_sinfo(CLUSTER, "gpu")
    assert [(n.cpus, n.gpus) for n in gpu.nodes] == [(32, 4), (32, 4), (96, 8)]
    both = parse_sinfo(CLUSTER, "debug,cpu")
    assert sorted(n.name for n in both.nodes) == ["c01", "c02", "d01"]
    unknown = parse_sinfo(LOCAL, "gpu")
    assert (unknown.name, unknown.nodes, unknown.known) == ("gpu", (), ("local",))
    no_default = parse_sinfo(CLUSTER.replace("cpu*", "cpu"))
    assert (no_default.name, no_default.nodes) == ("", ())


def test_a_default_is_lowered_to_the_largest_node():
    assert fit_request(parse_sinfo(LOCAL), cpus=4) == (
        2,
        "no node of partition local has more than 2 CPUs: asking for --cpus-per-task=2 instead of the default 4 "
        "(--cpus-per-task to choose)",
    )
    assert fit_request(parse_sinfo(LOCAL), cpus=2) == (2, "")  # fits: nothing said
    # 8 GPUs x 8 cores fit the one 8-GPU node (96 cores); 2 nodes with 4 GPUs x 24 only one of them
    gpu = parse_sinfo(CLUSTER, "gpu")
    assert fit_request(gpu, cpus=64, gpus=8, gpus_flag="--gpus-per-node") == (64, "")
    cpus, note = fit_request(gpu, cpus=96, gpus=4, gpus_flag="--gpus-per-node", nodes=2)
    assert cpus == 32 and note.startswith("fewer than 2 nodes of partition gpu with 4 GPUs have more than 32 CPUs")


def test_an_explicit_request_no_node_meets_is_one_line_naming_the_flag():
    def refused(part: str, **request) -> str:
        with pytest.raises(UserError) as e:
            fit_request(parse_sinfo(CLUSTER, part), **request)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert (
        refused("debug", cpus=4, cpus_flag="--cpus-per-task")
        == "--cpus-per-task 4: no node of partition debug has more than 2 CPUs; pass --cpus-per-task 2 or less"
    )
    assert refused("gpu", cpus=64, cpus_flag="--cpus-per-gpu", gpus=4, gpus_flag="--gpus-per-node", nodes=2) == (
        "--cpus-per-gpu 16 (64 CPUs): fewer than 2 nodes of partition gpu with 4 GPUs have more than 32 CPUs; "
        "pass --cpus-per-gpu 8 or less"
    )
    assert refused("cpu", cpus=8, gpus=1).startswith("--gpus-per-task 1: no node of partition cpu has a GPU")
    assert refused("gpu", cpus=8, gpus=16, gpus_flag="--gpus-per-node") == (
        "--gpus-per-node 16: no node of partition gpu has more than 8 GPUs; pass --gpus-per-node 8 or less"
    )
    assert refused("gpu", cpus=64, gpus=8, gpus_flag="--gpus-per-node", nodes=2) == (
        "--nodes 2: partition gpu has 1 node with 8 GPUs; pass --nodes 1 or less"
    )
    assert refused("cpu", cpus=8, nodes=3) == "--nodes 3: partition cpu has 2 nodes; pass --nodes 2 or less"
    assert refused("gpu", cpus=8, mem_mb=2_000_000, mem_arg="--sbatch-arg=--mem=2T").startswith(
        "--sbatch-arg=--mem=2T: no node of partition gpu has more than 1024000 MB of memory"
    )
    # memory narrows the nodes: only g03 has 600 GB, and with it 96 cores
    assert fit_request(parse_sinfo(CLUSTER, "gpu"), cpus=96, mem_mb=600_000) == (96, "")


def test_script_defaults_and_memory_units():
    assert script_cpus(SBATCH_DIR / "generate.sbatch") == 4
    assert script_cpus(SBATCH_DIR / "train.sbatch") == 8
    assert [parse_mem_mb(v) for v in ("64G", "500M", "2048", "1T", "512K", "0", "lots")] == [
        65536,
        500,
        2048,
        1048576,
        0,
        0,
        0,
    ]


def stand_in_sinfo(bin_dir: Path, text: str, code: int = 0) -> dict[str, str]:
    """A `sinfo` that prints `text` and exits `code`: the environment for run_cli that puts it first on PATH."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "cluster.txt").write_text(text)
    sinfo = bin_dir / "sinfo"
    sinfo.write_text(
        f"#!{sys.executable}\nimport sys\nsys.stdout.write(open({str(bin_dir / 'cluster.txt')!r}).read())\nsys.exit({code})\n"
    )
    sinfo.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{VENV_BIN}"}


def test_submit_dry_run_fits_and_refuses_against_sinfo(tmp_path, run_cli):
    env = stand_in_sinfo(tmp_path / "bin", CLUSTER)
    train = ("submit", "train", "--partition", "gpu", "--dry-run")
    out = run_cli(*train, "--nodes", "2", "--gpus-per-node", "4", env=env)
    assert out.returncode == 0 and out.stderr == "" and "--cpus-per-task=32" in out.stdout.split(), out.stderr
    # --cpus-per-gpu 16 given: refused, not lowered
    out = run_cli(*train, "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-gpu", "16", env=env)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1 and "--cpus-per-gpu 8" in out.stderr
    # CPU ranks on the default partition: train.sbatch's 8 cores fit 64-core nodes, nothing added
    out = run_cli("submit", "train", "--dry-run", env=env)
    assert out.returncode == 0 and out.stderr == "" and "--cpus-per-task" not in out.stdout
    out = run_cli(
        "submit", "sample", "m.onnx", "o", "--count", "4", "--tasks", "2", "--partition=debug", "--dry-run", env=env
    )
    assert out.returncode == 0 and "--cpus-per-task=2" in out.stdout.splitlines()[0].split(), out.stderr
    assert out.stderr == (
        "artscale: no node of partition debug has more than 2 CPUs: asking for --cpus-per-task=2 instead of the "
        "default 4 (--cpus-per-task to choose)\n"
    )
    out = run_cli(
        "submit", "generate", "m.onnx", "i", "o", "--tasks", "2", "--gpus-per-task", "2", "--dry-run", env=env
    )
    assert out.returncode == 2 and "--gpus-per-task 2: no node of partition cpu has a GPU" in out.stderr


def test_submit_checks_nothing_where_sinfo_does_not_answer(tmp_path, run_cli):
    """A sinfo that fails (no controller, no config) counts as none: today's lines, nothing on stderr."""
    env = stand_in_sinfo(tmp_path / "bin", "slurm_load_partitions: Unable to contact slurm controller\n", code=1)
    out = run_cli(
        "submit", "sample", "m.onnx", "o", "--count", "4", "--tasks", "2", "--cpus-per-task", "64", "--dry-run", env=env
    )
    assert out.returncode == 0 and out.stderr == "" and "--cpus-per-task=64" in out.stdout.split()

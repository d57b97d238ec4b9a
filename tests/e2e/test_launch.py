"""The shipped 2-node accelerate config, launched for real as 2 "machines" of one CPU rank each.

Runs use vgg_weights=random (no download in tests). ACCELERATE_USE_CPU=1 turns the MULTI_GPU
config into gloo CPU ranks; --num_processes 2 gives each "machine" one rank.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

CONFIG = ROOT / "launch" / "accelerate" / "nodes2x8.yaml"


@pytest.fixture(scope="session")
def node(env):
    """One `accelerate launch` of the 2-node config as machine `rank`, started."""

    def start(rank: int, address: list[str], port: int, overrides: list[str]) -> subprocess.Popen:
        cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(CONFIG), "--num_processes", "2"]
        cmd += ["--machine_rank", str(rank), *address, "--main_process_port", str(port)]
        return subprocess.Popen(
            [*cmd, str(ROOT / "launch" / "train.py"), *overrides],
            env={**env(), "ACCELERATE_USE_CPU": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    return start


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_together_with_the_address(shards, tmp_path, tiny, metrics, node):
    run, p = tmp_path / "run", port()
    nodes = [node(rank, ["--main_process_ip", "127.0.0.1"], p, tiny(run, shards, "max_steps=2")) for rank in (0, 1)]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert [m["step"] for m in metrics(run) if "loss" in m][-1] == 2


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_node_without_the_address_stops_in_seconds(rank, shards, tmp_path, tiny, node):
    start = time.monotonic()
    proc = node(rank, [], port(), tiny(tmp_path / "run", shards, "max_steps=2"))
    try:
        _, err = proc.communicate(timeout=60)  # without the placeholder: "None" retried for minutes
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.monotonic() - start < 30
    assert "MISSING --main_process_ip" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_module_trains_from_anywhere_as_launch_train_py_does(shards, tmp_path, tiny, env, metrics):
    """`accelerate launch -m artscale.train` (what the sbatch scripts start) and `python -m artscale.train`,
    run outside the checkout: the same entry as launch/train.py, its exit codes included."""
    run = tmp_path / "run"
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "-m", "artscale.train", *tiny(run, shards, "max_steps=2")]
    out = subprocess.run(
        cmd, env={**env(), "ACCELERATE_USE_CPU": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert [m["step"] for m in metrics(run) if "loss" in m][-1] == 2 and (run / "final").is_dir()
    bad = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "artscale.train", "--config", "difusion"],
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "config difusion is neither a file nor a preset" in bad.stderr

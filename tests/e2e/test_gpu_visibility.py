"""tests/conftest.py hides the GPU from every pytest run but the gpu tests run alone (`pytest -m gpu`),
checked in real pytest runs that pretend to be on a GPU host (CUDA_VISIBLE_DEVICES=3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artscale.cluster.slurm import gpus_on_node
from artscale.train.setup import gpus_asked_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "expr, alone",
    [
        ("", False),
        ("gpu", True),
        ("gpu and slow", True),
        ("gpu and not slurm", True),
        ("(gpu)", True),
        ("not gpu", False),
        ("gpu or slow", False),
        ("not slurm", False),
        ("slow", False),
        ("gpu and", False),  # pytest itself reports the broken expression
    ],
)
def test_only_an_expression_that_selects_the_gpu_tests_alone_keeps_the_gpu(expr, alone, gpu_selected):
    assert gpu_selected(expr) is alone


def test_an_empty_cuda_visible_devices_asks_for_no_gpu():
    assert gpus_asked_for({"CUDA_VISIBLE_DEVICES": ""}) == "" and gpus_on_node({"CUDA_VISIBLE_DEVICES": ""}) == 0


PROBE = """
import json, os, subprocess, sys
import pytest

OUT = os.environ["PROBE_OUT"]
def seen(where, value):
    with open(OUT, "a") as f:
        f.write(json.dumps([where, value]) + "\\n")

seen("collection", os.environ.get("CUDA_VISIBLE_DEVICES"))

def test_plain():
    seen("test", os.environ.get("CUDA_VISIBLE_DEVICES"))
    code = "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"
    seen("subprocess", subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip())

@pytest.mark.gpu
def test_gpu():
    seen("gpu test", os.environ.get("CUDA_VISIBLE_DEVICES"))
"""


def run_probe(tmp_path, *args: str) -> tuple[list, str]:
    """pytest over PROBE with the project's conftest as a plugin; (what the probe saw, pytest's output)."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    out = tmp_path / f"seen{len(list(tmp_path.glob('seen*')))}.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3", "PROBE_OUT": str(out), "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rs", "-q", *args]
    proc = subprocess.run(
        [*cmd, "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path / "test_probe.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()], proc.stdout


@pytest.mark.slow
def test_a_mixed_run_hides_the_gpu_from_tests_and_subprocesses_and_a_gpu_run_keeps_it(tmp_path):
    seen, output = run_probe(tmp_path)
    assert seen == [["collection", ""], ["test", ""], ["subprocess", "''"]]
    assert "1 passed, 1 skipped" in output and "run them alone, `pytest -m gpu`" in output
    seen, output = run_probe(tmp_path, "-m", "not slurm")
    assert seen[0] == ["collection", ""] and "1 passed, 1 skipped" in output
    seen, output = run_probe(tmp_path, "-m", "gpu")
    assert seen[0] == ["collection", "3"] and "1 deselected" in output
    # this machine's torch sees no CUDA device: the gpu test skips cleanly; on a GPU host it runs
    assert seen[1:] == [["gpu test", "3"]] or (seen[1:] == [] and "needs CUDA: torch sees no CUDA device" in output)

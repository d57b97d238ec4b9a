"""Bad CLI input: exit code 2 and exactly one line on stderr, never a traceback."""

import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "args,expected",
    [
        (["pack", "{tmp}/missing", "{tmp}/out"], "missing"),
        (["pack", "{tmp}", "{tmp}/out", "--size", "100"], "multiple of 8"),
        (["train", "batchsize=4"], "unknown config key batchsize"),
        (["train", "--config", "{tmp}/nope.yaml"], "nope.yaml is neither a file nor a preset"),
        (["train", "mixed_precision=fp8"], "choose one of no, bf16, fp16"),
        (["export", "{tmp}/junk.pth", "{tmp}/out.onnx"], "cannot read checkpoint"),
        (["export", "{tmp}/missing.pth", "{tmp}/out.onnx"], "not found"),
        (["generate", "{tmp}/missing.onnx", "{tmp}", "{tmp}/gen"], "missing.onnx"),
        (["info", "{tmp}/nothing-here"], "not found"),
        (["verify", "{tmp}"], "manifest"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, expected, run_cli):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr


def test_help_and_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("artscale ")
    result = run_cli("--help")
    for command in ("demo", "pack", "verify", "train", "export", "generate", "info", "report"):
        assert command in result.stdout


def _descendants(pid: int) -> set[int]:
    """Every live process below pid, from /proc (children, grandchildren: a fork server's workers)."""
    import os

    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.slow
def test_sigterm_unwinds_pack_and_leaves_no_worker_processes(tmp_path, make_image, run_cli):
    import os
    import signal
    import subprocess
    import time

    for i in range(160):
        make_image(tmp_path / "src" / ("a", "b")[i % 2] / f"{i:03d}.jpg", (900, 700), seed=i)
    out = tmp_path / "shards"
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "artscale"),
            "pack",
            tmp_path / "src",
            out,
            "--workers",
            "2",
            "--size",
            "32",
            "--shard-max-count",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, children = time.time() + 60, set()
    while time.time() < deadline and len(children) < 3:  # the fork server and its 2 decode workers
        children = _descendants(proc.pid)
        time.sleep(0.05)
    assert len(children) >= 3, "pack never started its decode workers"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "artscale: terminated"
    time.sleep(1)
    assert not [
        p for p in children if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
    ]
    rerun = run_cli("pack", tmp_path / "src", out, "--workers", "2", "--size", "32", "--shard-max-count", "10")
    assert rerun.returncode == 0, rerun.stderr
    assert run_cli("verify", out).returncode == 0

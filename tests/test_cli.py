"""Bad CLI input: exit code 2 and exactly one line on stderr, never a traceback."""

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    "args,expected",
    [
        (["pack", "{tmp}/missing", "{tmp}/out"], "missing"),
        (["pack", "{tmp}", "{tmp}/out", "--size", "100"], "multiple of 8"),
        (["train", "batchsize=4"], "unknown config key batchsize"),
        (["train", "--config", "{tmp}/nope.yaml"], "not found"),
        (["train", "mixed_precision=fp8"], "choose one of no, bf16, fp16"),
        (["export", "{tmp}/junk.pth", "{tmp}/out.onnx"], "cannot read checkpoint"),
        (["export", "{tmp}/missing.pth", "{tmp}/out.onnx"], "not found"),
        (["generate", "{tmp}/missing.onnx", "{tmp}", "{tmp}/gen"], "missing.onnx"),
        (["info", "{tmp}/nothing-here"], "not found"),
        (["verify", "{tmp}"], "manifest"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, expected):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr


def test_help_and_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("artscale ")
    result = run_cli("--help")
    for command in ("demo", "pack", "verify", "train", "export", "generate", "info"):
        assert command in result.stdout

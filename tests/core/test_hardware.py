"""Precision chosen by what the processor has: the pure choice on pretend CPUs and GPUs, the flag
reading on real /proc/cpuinfo text, and a real training run that says what it chose and why."""

from __future__ import annotations

import pytest

from artscale.core.hardware import choose_precision, cpu_flags, cpu_native_bf16

EPYC_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\n"
XEON_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


@pytest.mark.parametrize(
    "cpuinfo, flag",
    [(EPYC_AVX2, ""), (XEON_BF16, "avx512_bf16"), (SAPPHIRE, "amx_bf16"), (ARM, ""), ("", "")],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, flag):
    assert cpu_native_bf16(cpu_flags(cpuinfo)) == flag


@pytest.mark.parametrize(
    "requested, device, cpu_flag, gpu_bf16, mode, warning",
    [
        ("auto", "cpu", "", False, "no", False),  # AVX2-only: emulated bf16 is 10-20x slower than fp32
        ("auto", "cpu", "avx512_bf16", False, "bf16", False),
        ("auto", "cpu", "amx_bf16", False, "bf16", False),
        ("auto", "cuda", "", True, "bf16", False),  # Ampere and newer
        ("auto", "cuda", "avx512_bf16", False, "fp16", False),  # V100, T4: the GPU decides, not the CPU
        ("bf16", "cpu", "", False, "bf16", True),  # kept, with a warning
        ("bf16", "cpu", "avx512_bf16", False, "bf16", False),
        ("no", "cpu", "avx512_bf16", False, "no", False),  # the article's fp32 stays fp32
        ("no", "cuda", "", True, "no", False),
        ("fp16", "cuda", "", True, "fp16", False),
    ],
)
def test_auto_precision_follows_the_hardware(requested, device, cpu_flag, gpu_bf16, mode, warning):
    chosen = choose_precision(requested, device, cpu_flag, gpu_bf16)
    assert (chosen.mode, chosen.warning) == (mode, warning)
    if requested == "auto" and mode == "no":
        assert chosen.reason == "this CPU has no native bf16"
    if warning:
        assert "emulated" in chosen.reason and "auto" in chosen.reason


def test_a_run_says_which_precision_it_chose_and_why(shards, tmp_path, train_cli, tiny):
    proc = train_cli(tiny(tmp_path / "run", shards, "max_steps=1", "mixed_precision=auto"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = choose_precision("auto", "cpu", cpu_native_bf16(), False)
    assert f"mixed precision: {expected.mode} ({expected.reason})" in proc.stdout + proc.stderr

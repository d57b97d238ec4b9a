"""What this machine's processors can do fast, and the precision that follows from it.

One detection for training, the demo, `artscale doctor` and the benchmarks: bf16 autocast on a
CPU without native bf16 (no avx512_bf16, no AMX) is emulated and runs several times slower than
fp32, so `mixed_precision=auto` decides by what the CPU or GPU has, never by what one machine had.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

# Flags in /proc/cpuinfo for instructions that compute bf16 natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first processor in /proc/cpuinfo (or in `cpuinfo`); empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> str:
    """The flag that makes bf16 native on this CPU ("" when bf16 would be emulated)."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), "")


def cuda_bf16() -> bool:
    """Whether the current CUDA device computes bf16 natively (Ampere and newer); False without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation
        return torch.cuda.is_bf16_supported()


class Precision(NamedTuple):
    """The mixed precision to train in, why (for the first log lines), and whether that is a warning."""

    mode: str  # no | bf16 | fp16, as accelerate takes it
    reason: str
    warning: bool = False


def choose_precision(requested: str, device_type: str, cpu_flag: str, gpu_bf16: bool) -> Precision:
    """`auto`: bf16 on a GPU that has it, else fp16 with loss scaling; on a CPU, bf16 where it is
    native (`cpu_flag`, from `cpu_native_bf16`), else fp32 (`no`). An explicit choice is kept, and
    bf16 on a CPU without native support comes with a warning."""
    if device_type == "cuda":
        if requested != "auto":
            return Precision(requested, "as configured")
        if gpu_bf16:
            return Precision("bf16", "this GPU has native bf16")
        return Precision("fp16", "this GPU has no native bf16: fp16 with loss scaling")
    if requested == "auto":
        if cpu_flag:
            return Precision("bf16", f"this CPU has native bf16: {cpu_flag}")
        return Precision("no", "this CPU has no native bf16")
    if requested == "bf16" and not cpu_flag:
        return Precision(
            "bf16",
            "as configured, but this CPU has no native bf16 (no avx512_bf16 or AMX): it is emulated and several "
            "times slower than fp32; mixed_precision=auto picks fp32 here",
            warning=True,
        )
    return Precision(requested, "as configured")

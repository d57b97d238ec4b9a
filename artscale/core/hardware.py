"""What this machine's processors can do fast, the precision that follows from it, and the NVIDIA driver.

One detection for training, the demo, `artscale doctor` and the benchmarks: bf16 autocast on a
CPU without native bf16 (no avx512_bf16, no AMX) is emulated and runs several times slower than
fp32, so `mixed_precision=auto` decides by what the CPU or GPU has, never by what one machine had.
"""

from __future__ import annotations

import re
import shutil
import subprocess
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


def cpu_model(cpuinfo: str | None = None) -> str:
    """The first processor's model name in /proc/cpuinfo (or in `cpuinfo`); "" where it says none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return " ".join(value.split())
    return ""


# --- the NVIDIA driver, and which CUDA it can run ---

# The least driver branch each CUDA major needs ("minor version compatibility": any 12.x build runs
# on R525+, with a limited feature set) and the branch each toolkit release ships with (all of its
# features, PTX JIT of its code included). Linux x86_64. Sources: NVIDIA, "CUDA Compatibility",
# table "CUDA Toolkit 11.x, 12.x, and 13.x Driver Version Ranges"; CUDA Toolkit Release Notes,
# table "CUDA Toolkit and Corresponding Driver Versions"; 13.2 from its Linux installer (595.58.03).
MINOR_COMPAT_DRIVER = {11: 450, 12: 525, 13: 580}
TOOLKIT_DRIVER = {
    "12.0": 525,
    "12.1": 530,
    "12.2": 535,
    "12.3": 545,
    "12.4": 550,
    "12.5": 555,
    "12.6": 560,
    "12.8": 570,
    "12.9": 575,
    "13.0": 580,
    "13.1": 590,
    "13.2": 595,
}
SMI_TIMEOUT_S = 20
_VERSION = re.compile(r"\b(\d{3,})\.\d+(?:\.\d+)?\b")


class Driver(NamedTuple):
    """What the NVIDIA driver says: its version ("" when none answers), its GPUs, and all that in words."""

    version: str
    gpus: tuple[str, ...]
    summary: str
    mig: bool = False


def driver_branch(version: str) -> int | None:
    """The driver's branch (535 for 535.104.05); None for no driver."""
    found = _VERSION.search(version or "")
    return int(found.group(1)) if found else None


def parse_nvidia_smi(stdout: str, returncode: int = 0, stderr: str = "") -> Driver:
    """`nvidia-smi --query-gpu=name,driver_version,memory.total,mig.mode.current --format=csv,noheader`."""
    gpus, versions, mig = [], [], False
    if returncode == 0:
        for line in stdout.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) < 2 or not driver_branch(fields[1]):
                continue
            memory = fields[2] if len(fields) > 2 and fields[2][:1].isdigit() else ""
            gpus.append(f"{fields[0]} ({memory})" if memory else fields[0])
            versions.append(fields[1])
            mig |= len(fields) > 3 and fields[3].lower() == "enabled"
    if not versions:
        said = next((ln.strip() for ln in (stdout + "\n" + stderr).splitlines() if ln.strip()), f"exit {returncode}")
        return Driver("", (), f"nvidia-smi: {said[:200]}")
    summary = f"nvidia-smi: driver {versions[0]}, {len(gpus)} GPU(s): {'; '.join(gpus)}" + (", MIG on" if mig else "")
    return Driver(versions[0], tuple(gpus), summary[:300], mig)


def parse_proc_driver(text: str) -> Driver:
    """/proc/driver/nvidia/version: `NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  ...`."""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    found = _VERSION.search(first)
    return Driver(found.group(0) if found else "", (), f"/proc/driver/nvidia/version: {' '.join(first.split())[:120]}")


def nvidia_driver(timeout: float = SMI_TIMEOUT_S) -> Driver:
    """The NVIDIA driver as `nvidia-smi` sees it, else as the kernel module says; never raises, never
    waits longer than `timeout` (a hung driver makes nvidia-smi hang)."""
    proc = Path("/proc/driver/nvidia/version")
    smi = shutil.which("nvidia-smi")
    found = Driver("", (), "no nvidia-smi and no NVIDIA driver loaded")
    if smi is not None:
        query = "--query-gpu=name,driver_version,memory.total,mig.mode.current"
        try:
            out = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=timeout)
            found = parse_nvidia_smi(out.stdout, out.returncode, out.stderr)
        except subprocess.TimeoutExpired:
            found = Driver("", (), f"nvidia-smi did not answer in {timeout:g} s")
        except OSError as e:
            found = Driver("", (), f"nvidia-smi failed ({type(e).__name__}: {e})")
    if not found.version:
        try:
            kernel = parse_proc_driver(proc.read_text())
        except OSError:
            return found
        summary = kernel.summary if smi is None else f"{found.summary}; {kernel.summary}"
        return Driver(kernel.version, (), summary)
    return found


class DriverVerdict(NamedTuple):
    """Whether a driver runs a CUDA build (None: nothing to judge), and why, in words."""

    ok: bool | None
    text: str


def driver_verdict(driver_version: str, cuda: str | None) -> DriverVerdict:
    """Can a driver (`535.104.05`, "" for none) run code built for `cuda` (`12.6`; None: a CPU build)?"""
    if not cuda:
        return DriverVerdict(None, "no CUDA build to judge the driver against")
    major_minor = ".".join(cuda.split(".")[:2])
    need = MINOR_COMPAT_DRIVER.get(int(cuda.split(".")[0]))
    branch = driver_branch(driver_version)
    if need is None:
        return DriverVerdict(None, f"CUDA {cuda} is not in artscale's driver table")
    if branch is None:
        return DriverVerdict(False, f"no NVIDIA driver here; CUDA {major_minor} needs R{need}+")
    if branch < need:
        return DriverVerdict(
            False, f"driver R{branch} is too old for CUDA {major_minor} (CUDA {cuda.split('.')[0]}.x needs R{need}+)"
        )
    own = TOOLKIT_DRIVER.get(major_minor)
    if own and branch < own:
        return DriverVerdict(
            True,
            f"driver R{branch} runs CUDA {major_minor} through minor version compatibility (its own driver is "
            f"R{own}+; without it no PTX JIT of newer code)",
        )
    return DriverVerdict(True, f"driver R{branch} supports CUDA {major_minor}")

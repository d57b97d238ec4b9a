"""`artscale doctor`: the real command on this machine (text, --json, --need cuda), the driver verdict
on pretend nvidia-smi outputs x torch CUDA versions, the fix named for pretend machines, and probes
that hang or crash reported instead of stopping doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from artscale.core.hardware import cpu_native_bf16, driver_verdict, parse_nvidia_smi, parse_proc_driver
from artscale.doctor import ORT_CUDA12, ORT_CUDA13, PYTORCH_CU126, cuda_fix, ort_log_reason, run_probe

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

SMI_R535 = (
    "NVIDIA A100-SXM4-80GB, 535.104.05, 81920 MiB, Disabled\nNVIDIA A100-SXM4-80GB, 535.104.05, 81920 MiB, Disabled\n"
)
SMI_R570 = "NVIDIA H100 80GB HBM3, 570.86.15, 81559 MiB, Disabled\n"
SMI_R580 = "NVIDIA H200, 580.65.06, 143771 MiB, [N/A]\n"
SMI_MIG = "NVIDIA A100-SXM4-40GB, 550.54.15, 40960 MiB, Enabled\n"
SMI_NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
    "NVIDIA driver is installed and running.\n"
)
SMI = {"R535": (SMI_R535, 0), "R570": (SMI_R570, 0), "R580": (SMI_R580, 0), "MIG": (SMI_MIG, 0)}
SMI["none"] = (SMI_NO_DRIVER, 9)
CUDAS = ("12.6", "12.8", "13.0", None)
# ok per torch CUDA (12.6, 12.8, 13.0, a CPU-only build): CUDA 13 needs R580+, any 12.x R525+.
EXPECTED = {
    "R535": (True, True, False, None),
    "R570": (True, True, False, None),
    "R580": (True, True, True, None),
    "MIG": (True, True, False, None),
    "none": (False, False, False, None),
}


@pytest.mark.parametrize("smi", EXPECTED)
@pytest.mark.parametrize("index", range(len(CUDAS)))
def test_driver_verdict_on_pretend_nvidia_smi_outputs(smi, index):
    driver = parse_nvidia_smi(*SMI[smi])
    cuda = CUDAS[index]
    verdict = driver_verdict(driver.version, cuda)
    assert verdict.ok is EXPECTED[smi][index], verdict.text
    if verdict.ok is False and driver.version:
        assert "too old" in verdict.text and "R580+" in verdict.text
    # below the toolkit's own driver (12.6: R560, 12.8: R570) it runs through minor version compatibility
    compat = smi in ("R535", "MIG") and cuda in ("12.6", "12.8")
    assert ("minor version compatibility" in verdict.text) is compat


def test_nvidia_smi_and_the_kernel_module_are_read():
    r535 = parse_nvidia_smi(*SMI["R535"])
    assert (r535.version, len(r535.gpus), r535.mig) == ("535.104.05", 2, False)
    assert r535.gpus[0] == "NVIDIA A100-SXM4-80GB (81920 MiB)"
    mig = parse_nvidia_smi(*SMI["MIG"])
    assert (mig.version, mig.mig) == ("550.54.15", True) and "MIG on" in mig.summary
    assert parse_nvidia_smi(*SMI["R580"]).gpus == ("NVIDIA H200 (143771 MiB)",)
    none = parse_nvidia_smi(*SMI["none"])
    assert none.version == "" and "couldn't communicate" in none.summary
    assert parse_nvidia_smi("", 6, "No devices were found").summary == "nvidia-smi: No devices were found"
    closed = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version: 12\n"
    )
    opened = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n"
    assert parse_proc_driver(closed).version == "535.104.05"
    assert parse_proc_driver(opened).version == "570.86.15"


def _machine(
    driver: str = "580.65.06",
    torch_cuda: str | None = "13.0",
    available: bool = True,
    providers: tuple = ("CUDAExecutionProvider", "CPUExecutionProvider"),
    ort: str = "1.31.1",
    ort_cuda: str | None = "13.0",
    session_ok: bool = True,
    visible: str | None = None,
) -> dict:
    """A pretend machine, as `gather` describes one."""
    return {
        "torch": {"version": "2.14.1+cu130", "cuda": torch_cuda, "cuda_available": available, "torchvision": "0.29.1"},
        "driver": {"version": driver, "summary": f"nvidia-smi: driver {driver}" if driver else "no nvidia-smi"},
        "onnxruntime": {
            "version": ort,
            "cuda": ort_cuda,
            "providers": list(providers),
            "distributions": {"onnxruntime": None, "onnxruntime-gpu": ort},
            "cuda_session": {"ok": session_ok, "error": "" if session_ok else "fallback disabled", "log": ""},
        },
        "cores": {"env": {"CUDA_VISIBLE_DEVICES": visible}},
    }


def test_the_fix_named_for_pretend_machines():
    assert cuda_fix(_machine()) == ""
    # onnxruntime's CPU build: onnxruntime-gpu, for the CUDA the driver runs
    cpu_ort = {"providers": ("CPUExecutionProvider",), "ort": "1.31.1", "ort_cuda": None}
    fix = cuda_fix(_machine(**cpu_ort))
    assert "is a CPU build" in fix and f'pip install "{ORT_CUDA13}"' in fix and "pip uninstall -y onnxruntime" in fix
    assert f'pip install "{ORT_CUDA12}"' in cuda_fix(_machine(driver="535.104.05", torch_cuda="12.6", **cpu_ort))
    # a CPU-only torch: PyPI's CUDA 13 build on R580+, PyTorch's CUDA 12.6 index on R535
    fix = cuda_fix(_machine(torch_cuda=None, available=False))
    assert "CPU-only build" in fix and '"torch==2.14.*" "torchvision==0.29.*"' in fix and "--index-url" not in fix
    assert f"--index-url {PYTORCH_CU126}" in cuda_fix(_machine(driver="535.104.05", torch_cuda=None, available=False))
    # the default install (CUDA 13) on an R535 driver: both CUDA 12 lines
    fix = cuda_fix(_machine(driver="535.104.05", available=False))
    assert "R535 is too old for CUDA 13.0" in fix and PYTORCH_CU126 in fix and ORT_CUDA12 in fix
    # torch from the CUDA 12.6 index works on R570, onnxruntime-gpu 1.31 (CUDA 13) cannot start
    fix = cuda_fix(_machine(driver="570.86.15", torch_cuda="12.6", session_ok=False))
    assert "built for CUDA 13.0" in fix and ORT_CUDA12 in fix
    # no driver at all; a GPU hidden by CUDA_VISIBLE_DEVICES
    assert "no NVIDIA driver answers here" in cuda_fix(_machine(driver="", available=False))
    assert "hides every GPU" in cuda_fix(_machine(available=False, visible="-1"))
    # both onnxruntime packages in one environment
    both = _machine()
    both["onnxruntime"]["distributions"]["onnxruntime"] = "1.31.1"
    assert "share one module" in cuda_fix(both)


def test_onnxruntimes_log_line_names_the_missing_library():
    stderr = (
        "\x1b[0;93m2026-12-04 17:51:43 [W:onnxruntime:, graph.cc:125 MergeShapeInfo] Error merging shape info\x1b[m\n"
        "\x1b[1;31m2026-12-04 17:51:43 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
        "/src/provider_bridge_ort.cc:2043 Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
        "/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
        "libcudnn.so.9: cannot open shared object file: No such file or directory\n"
    )
    assert ort_log_reason(stderr) == (
        "Failed to load library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared "
        "object file: No such file or directory"
    )


def test_a_probe_that_hangs_or_crashes_is_reported_not_raised():
    started = time.monotonic()
    facts, _ = run_probe([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert facts == {"error": "timed out after 1 s"} and time.monotonic() - started < 15
    facts, _ = run_probe([sys.executable, "-c", "import os; os.abort()"], timeout=30)
    assert facts["error"].startswith("killed by SIGABRT")
    facts, _ = run_probe([sys.executable, "-c", "raise SystemExit('no torch here')"], timeout=30)
    assert facts == {"error": "exit 1: no torch here"}
    facts, _ = run_probe([sys.executable, "-c", "print('noise'); print('{\"a\": 1}')"], timeout=30)
    assert facts == {"a": 1}


def test_the_install_page_and_the_extra_give_the_lines_doctor_names():
    page, pyproject = (ROOT / "docs" / "install.md").read_text(), (ROOT / "pyproject.toml").read_text()
    assert PYTORCH_CU126 in page and ORT_CUDA12 in page and "artscale doctor --need cuda" in page
    assert f'cuda12 = ["{ORT_CUDA12};' in pyproject


def _doctor(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "artscale"), "doctor", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_doctor_on_this_machine(tmp_path):
    """The real command; the GPU hidden, so that it needs no GPU and means the same on a GPU host."""
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"")
    env = {"CUDA_VISIBLE_DEVICES": "", "SLURM_CPUS_PER_TASK": "3", "TORCH_HOME": str(tmp_path)}
    text, as_json = _doctor("--need", "cuda", env=env), _doctor("--json", env=env)
    out, err = text.communicate(timeout=300)
    assert text.returncode == 2, err
    lines = out.splitlines()
    for section in ("artscale ", "torch ", "driver ", "onnxruntime ", "cpu ", "cores ", "weights ", "CUDA "):
        assert any(line.startswith(section) for line in lines), (section, out)
    assert "  CUDA run   fails: " in out and "SLURM_CPUS_PER_TASK=3" in out
    assert lines[-1].startswith("fix: ") and ("driver" in lines[-1] or "CUDA_VISIBLE_DEVICES" in lines[-1])
    out, err = as_json.communicate(timeout=300)
    assert as_json.returncode == 0, err
    facts = json.loads(out)
    keys = {"artscale", "python", "torch", "driver", "onnxruntime", "cpu", "cores", "weights", "fix", "cuda_ready"}
    assert keys <= facts.keys() and (facts["need"], facts["ok"], facts["cuda_ready"]) == (None, True, False)
    assert facts["torch"]["version"].split("+")[0] == metadata.version("torch").split("+")[0]
    assert facts["torch"]["cuda_available"] is False and facts["torch"]["devices"] == []
    ort = facts["onnxruntime"]
    assert ort["version"] in (ort["distributions"]["onnxruntime-gpu"], ort["distributions"]["onnxruntime"])
    assert ort["cpu_session"] == "ok"  # the tiny graph runs: the CUDA failure is CUDA's
    assert ort["cuda_session"]["ok"] is False and ort["cuda_session"]["error"]
    assert facts["cpu"]["native_bf16"] == cpu_native_bf16()
    assert facts["cpu"]["auto"] == ("bf16" if cpu_native_bf16() else "no")
    assert facts["cores"]["usable"] == len(os.sched_getaffinity(0))
    assert facts["cores"]["env"]["SLURM_CPUS_PER_TASK"] == "3" and facts["cores"]["env"]["CUDA_VISIBLE_DEVICES"] == ""
    weights = facts["weights"]
    assert weights["vgg16"] == {"path": str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"), "found": True}
    assert weights["inception"]["found"] is False and weights["inception"]["path"].startswith(str(tmp_path))
    assert facts["fix"].startswith("fix: ")

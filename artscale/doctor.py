"""`artscale doctor [--need cuda] [--json]`: what this machine can run, on one screen, before a long job.

torch (with the weight files) and onnxruntime are each looked at in a subprocess of their own
(`doctor_probes.py`), in parallel and under a timeout, as the driver is through nvidia-smi: a hung driver, a library that
crashes as it loads or a slow shared file system shows as that probe's failure, and doctor still
prints the rest. `--need cuda` exits 2 unless torch sees a CUDA device and an onnxruntime CUDA
session really runs, with a last line that names the fix (docs/install.md's lines, for CUDA 13
and CUDA 12 drivers).
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

from artscale import __version__
from artscale.core.hardware import (
    MINOR_COMPAT_DRIVER,
    choose_precision,
    cpu_model,
    cpu_native_bf16,
    driver_branch,
    driver_verdict,
    nvidia_driver,
)
from artscale.core.system import usable_cores
from artscale.doctor_probes import PROBES, first_line

PROBE_TIMEOUT_S = 120.0  # importing torch from a busy shared file system can take a minute
ENV_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_CPUS_PER_TASK",
    "SLURM_JOB_CPUS_PER_NODE",
    "SLURM_GPUS_ON_NODE",
    "CUDA_VISIBLE_DEVICES",
)
# What the registries serve (checked with pip against PyPI, 2026-12; docs/install.md):
# PyPI's torch 2.14 is built for CUDA 13.0; PyTorch's own index has CUDA 12.6 builds (no 12.8 since 2.12).
PYTORCH_CU126 = "https://download.pytorch.org/whl/cu126"
# onnxruntime-gpu on PyPI: 1.19-1.26 are built for CUDA 12 (1.26.0 needs Python 3.11+, pip picks
# 1.23.2 on 3.10), 1.27 and newer for CUDA 13.
ORT_CUDA12 = "onnxruntime-gpu>=1.19,<1.27"
ORT_CUDA13 = "onnxruntime-gpu>=1.27"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LIB_PATH = re.compile(r"/\S*/([^/\s]+\.so[\w.]*)")


def _series(version: str | None, default: str) -> str:
    """`2.14.1+cu130` -> `2.14.*`: the same release series in another build."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return f"{found.group(1)}.{found.group(2)}.*" if found else f"{default}.*"


def torch_line(cuda12: bool, torch_version: str | None = None, torchvision_version: str | None = None) -> str:
    """The pip line that installs torch built for CUDA 12.6 (PyTorch's index) or CUDA 13 (PyPI)."""
    pins = f'"torch=={_series(torch_version, "2.14")}" "torchvision=={_series(torchvision_version, "0.29")}"'
    return f"pip uninstall -y torch torchvision && pip install {pins}" + (
        f" --index-url {PYTORCH_CU126}" if cuda12 else ""
    )


def ort_line(cuda12: bool) -> str:
    """The pip line that installs onnxruntime-gpu built for CUDA 12 or CUDA 13 (both from PyPI)."""
    return f'pip uninstall -y onnxruntime onnxruntime-gpu && pip install "{ORT_CUDA12 if cuda12 else ORT_CUDA13}"'


def ort_cuda(version: str, built_for: str | None) -> str | None:
    """The CUDA an onnxruntime-gpu build needs: what it says, else what PyPI's builds of that version had."""
    if built_for:
        return built_for
    found = re.match(r"1\.(\d+)", version or "")
    if not found or int(found.group(1)) < 19:
        return None
    return "13" if int(found.group(1)) >= 27 else "12"


def run_probe(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[dict, str]:
    """Run a command that prints one JSON object as its last line; returns (that object, its stderr).
    Never raises: a timeout, a crash or no JSON comes back as {"error": "..."}."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return {"error": f"timed out after {timeout:g} s"}, stderr
    except OSError as e:
        return {"error": f"could not start ({type(e).__name__}: {e})"}, ""
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), out.stderr
        except ValueError:
            pass
    if out.returncode < 0:
        how = f"killed by {signal.Signals(-out.returncode).name}"
    else:
        how = f"exit {out.returncode}"
    said = next((_ANSI.sub("", ln).strip() for ln in reversed(out.stderr.splitlines()) if ln.strip()), "")
    return {"error": f"{how}: {said[:300]}" if said else how}, out.stderr


def ort_log_reason(stderr: str) -> str:
    """onnxruntime's first error line that says why CUDA did not start (`libcudnn.so.9: cannot open ...`)."""
    for line in stderr.splitlines():
        line = _ANSI.sub("", line)
        if "[E:onnxruntime" not in line or "fallback to CPU EP has been explicitly disabled" in line:
            continue
        text = line.rsplit("FAIL : ", 1)[-1] if "FAIL : " in line else line.split("] ", 1)[-1]
        return _LIB_PATH.sub(r"\1", text.strip())[:300]
    return ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def gather(timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Every fact doctor reports, as one JSON-ready dict (the probes run at once)."""
    started = time.monotonic()
    probe = [sys.executable, "-m", "artscale.doctor_probes"]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # the installed artscale, not a folder of that name in the cwd
    with ThreadPoolExecutor(max_workers=3) as pool:
        driver_job = pool.submit(nvidia_driver)
        jobs = {name: pool.submit(run_probe, [*probe, name], timeout, env) for name in PROBES}
        try:
            driver = driver_job.result()._asdict()
        except Exception as e:  # nvidia_driver never raises; if it ever does, doctor still reports the rest
            driver = {
                "version": "",
                "gpus": [],
                "summary": f"reading the driver failed: {first_line(e)}",
                "mig": False,
            }
        results = {name: job.result() for name, job in jobs.items()}
    torch_facts, ort_facts = results["torch"][0], results["onnxruntime"][0]
    session = ort_facts.get("cuda_session")
    if isinstance(session, dict) and not session.get("ok"):
        session["log"] = ort_log_reason(results["onnxruntime"][1])
    ort_facts["distributions"] = {d: _version(d) for d in ("onnxruntime", "onnxruntime-gpu")}
    torch_facts["torchvision"] = _version("torchvision")
    driver["gpus"] = list(driver["gpus"])
    driver["for_torch"] = driver_verdict(driver["version"], torch_facts.get("cuda"))._asdict()
    built_for = ort_cuda(ort_facts.get("version", ""), ort_facts.get("cuda"))
    driver["for_onnxruntime"] = driver_verdict(driver["version"], built_for)._asdict()
    flag = cpu_native_bf16()
    auto = choose_precision("auto", "cpu", flag, False)
    facts = {
        "artscale": __version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch_facts,
        "driver": driver,
        "onnxruntime": ort_facts,
        "cpu": {"model": cpu_model(), "native_bf16": flag, "auto": auto.mode, "auto_reason": auto.reason},
        "cores": {"usable": usable_cores(), "machine": os.cpu_count(), "env": {k: os.environ.get(k) for k in ENV_KEYS}},
        "weights": torch_facts.pop("weights", {"error": torch_facts.get("error", "not looked up")}),
    }
    facts["fix"] = cuda_fix(facts)
    facts["cuda_ready"] = not facts["fix"]
    facts["seconds"] = round(time.monotonic() - started, 1)
    return facts


def cuda_fix(facts: dict) -> str:
    """Empty when torch sees a CUDA device and an onnxruntime CUDA session runs; else one line, `fix: ...`.
    Reads the facts `gather` collects (pure: tested on pretend machines)."""
    t, o, d = facts["torch"], facts["onnxruntime"], facts["driver"]
    branch = driver_branch(d["version"])
    cuda12 = branch is not None and branch < MINOR_COMPAT_DRIVER[13]  # R525-R575: the CUDA 12 builds
    torch_fix = torch_line(cuda12, t.get("version"), t.get("torchvision"))
    build = f"CUDA 12 builds (driver R{branch})" if cuda12 else "CUDA 13 builds (driver R580+)"
    if "error" in t:
        return f"fix: torch does not load here ({t['error']}): reinstall it, {build}: {torch_fix}"
    if not t.get("cuda"):
        what = f"a ROCm build (HIP {t['hip']}); artscale's GPU paths need CUDA" if t.get("hip") else "a CPU-only build"
        return f"fix: torch {t.get('version')} is {what}: install the {build}: {torch_fix}"
    if not t.get("cuda_available"):
        if not d.get("version"):
            return (
                f"fix: no NVIDIA driver answers here ({d.get('summary')}): run where a GPU is "
                "(a node with a GPU; under SLURM a job with --gpus=1 or --gres=gpu:1)"
            )
        verdict = driver_verdict(d["version"], t["cuda"])
        if verdict.ok is False:
            return f"fix: {verdict.text}: install the {build}: {torch_fix}; {ort_line(cuda12)}"
        visible = facts["cores"]["env"].get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            return f"fix: CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from torch: unset it, or name a GPU"
        why = t.get("cuda_warning") or "torch.cuda.is_available() is False"
        return (
            f"fix: torch sees no CUDA device although driver R{branch} answers ({why}): check the GPU with nvidia-smi"
        )
    if "error" in o:
        return f"fix: onnxruntime does not load here ({o['error']}): {ort_line(cuda12)}"
    dists = o.get("distributions", {})
    if dists.get("onnxruntime") and dists.get("onnxruntime-gpu"):
        return (
            f"fix: both onnxruntime {dists['onnxruntime']} and onnxruntime-gpu {dists['onnxruntime-gpu']} are "
            f"installed; they share one module: {ort_line(cuda12)}"
        )
    providers = o.get("providers", [])
    if "CUDAExecutionProvider" not in providers:
        return f"fix: onnxruntime {o.get('version')} is a CPU build (providers: {', '.join(providers)}): {ort_line(cuda12)}"
    session = o.get("cuda_session", {})
    if session.get("ok"):
        return ""
    reason = session.get("log") or session.get("error") or "no reason given"
    built_for = ort_cuda(o.get("version", ""), o.get("cuda"))
    verdict = driver_verdict(d["version"], built_for)
    if verdict.ok is False and branch is not None:  # no version (a container without nvidia-smi): not judged
        return (
            f"fix: onnxruntime-gpu {o.get('version')} is built for CUDA {built_for}; {verdict.text}: {ort_line(True)}"
        )
    torch_major, ort_major = t["cuda"].split(".")[0], (built_for or "").split(".")[0]
    if ort_major and ort_major != torch_major:
        return (
            f"fix: onnxruntime-gpu {o.get('version')} is built for CUDA {built_for} but torch brings CUDA "
            f"{t['cuda']} libraries ({reason}): {ort_line(torch_major == '12')}"
        )
    return (
        f'fix: an onnxruntime CUDA session does not run ({reason}): pip install "onnxruntime-gpu[cuda,cudnn]=='
        f'{o.get("version")}" brings the CUDA and cuDNN libraries it was built for'
    )


# --- the screen ---


def _weights_line(label: str, w: dict) -> str:
    if "path" not in w:
        return f"{label}: unknown"
    return f"{label}: {'found' if w.get('found') else 'missing'} {w['path']}"


def render(facts: dict) -> list[str]:
    """The facts on one screen, the fix (if any) on the last line."""
    t, o, d, c, k = facts["torch"], facts["onnxruntime"], facts["driver"], facts["cpu"], facts["cores"]
    lines = [f"artscale {facts['artscale']}, Python {facts['python']} ({facts['executable']})"]
    if "error" in t:
        lines.append(f"torch        probe failed: {t['error']}")
    else:
        lines.append(
            f"torch        {t.get('version')}, built for CUDA {t.get('cuda') or 'none (CPU-only)'}, cuDNN "
            f"{t.get('cudnn') or 'none'}; torchvision {t.get('torchvision') or 'missing'}"
        )
        for dev in t.get("devices", []):
            lines.append(
                f"  cuda:{dev['index']}     {dev['name']}, {dev['memory_bytes'] / 2**30:.1f} GiB, sm {dev['capability']}, "
                f"native bf16: {'yes' if dev['bf16'] else 'no'} -> auto: {dev['auto']}"
            )
        if not t.get("devices"):
            lines.append(f"  devices    none visible: {t.get('cuda_warning') or 'torch.cuda.is_available() is False'}")
    lines.append(f"driver       {d.get('summary')}")
    lines.append(f"  for torch  {d['for_torch']['text']}")
    if "error" in o:
        lines.append(f"onnxruntime  probe failed: {o['error']}")
    else:
        built = f", built for CUDA {o['cuda']}" if o.get("cuda") else ""
        short = ", ".join(p.removesuffix("ExecutionProvider") for p in o.get("providers", []))
        lines.append(
            f"onnxruntime  {o.get('version')} ({o.get('package') or 'onnxruntime'}{built}); providers: {short}"
        )
        s = o.get("cuda_session", {})
        said = s.get("log") or s.get("error") or "no reason given"  # the log says why; the error only that it failed
        lines.append(
            f"  CUDA run   {'ok: a Conv and a MatMul ran on CUDAExecutionProvider' if s.get('ok') else 'fails: ' + said}"
        )
        if o.get("cuda"):
            lines.append(f"  for ort    {d['for_onnxruntime']['text']}")
    lines.append(
        f"cpu          {c['model'] or 'unknown model'}; native bf16: {c['native_bf16'] or 'no'} -> auto on CPU: "
        f"{c['auto']} ({c['auto_reason']})"
    )
    env = ", ".join(f"{key}={'-' if value is None else value}" for key, value in k["env"].items())
    lines.append(f"cores        {k['usable']} usable of {k['machine']}; {env}")
    w = facts["weights"]
    if "error" in w:
        lines.append(f"weights      probe failed: {w['error']}")
    else:
        lines.append(f"weights      {_weights_line('VGG16 (training)', w.get('vgg16', {}))}")
        lines.append(f"             {_weights_line('Inception-v3 (artscale eval)', w.get('inception', {}))}")
    if facts["cuda_ready"]:
        lines.append(f"CUDA         ready: torch sees {len(t['devices'])} device(s), an onnxruntime CUDA session ran")
    else:
        lines += ["CUDA         not usable here", facts["fix"]]
    return lines


def doctor(need: str | None = None, as_json: bool = False) -> int:
    """Print the facts (a screen, or one JSON object); 0 when the machine can do what `need` asks, else 2."""
    facts = gather()
    facts["need"] = need
    facts["ok"] = facts["cuda_ready"] if need == "cuda" else True
    print(json.dumps(facts) if as_json else "\n".join(render(facts)), flush=True)
    return 0 if facts["ok"] else 2

"""This module holds the probes `artscale doctor` runs, each in its own subprocess.

`python -m artscale.doctor_probes NAME` prints one JSON line. torch (its CUDA, cuDNN, devices, and where the weight files are looked for)
and onnxruntime (its providers, and a tiny graph run on CPU and on CUDA with the CPU fallback
disabled) each run apart, so that a crash or a hang in either is only that probe's failure.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from artscale.core.hardware import choose_precision
from artscale.core.system import onnxruntime

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def first_line(e: object) -> str:
    """An error's first line, without onnxruntime's `[ONNXRuntimeError] : 1 : FAIL : ` prefix."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return _ORT_PREFIX.sub("", lines[0] if lines else type(e).__name__)[:300]


def _probe_torch() -> dict:
    import warnings

    import torch

    from artscale.core.hardware import cuda_bf16

    facts: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda}
    facts["hip"] = getattr(torch.version, "hip", None)
    try:
        facts["cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # a cuDNN that does not load is a fact to report, not a reason to stop
        facts["cudnn"] = f"fails: {first_line(e)}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts["cuda_available"] = torch.cuda.is_available()
    # torch says why it sees no device only in a warning ("The NVIDIA driver on your system is too old").
    facts["cuda_warning"] = next((first_line(w.message) for w in caught), "")
    devices = []
    for i in range(torch.cuda.device_count() if facts["cuda_available"] else 0):
        props = torch.cuda.get_device_properties(i)
        with torch.cuda.device(i):
            bf16 = cuda_bf16()
        auto = choose_precision("auto", "cuda", "", bf16).mode
        devices.append(
            {
                "index": i,
                "name": props.name,
                "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "bf16": bf16,
                "auto": auto,
            }
        )
    facts["devices"] = devices
    try:  # after the facts above: a weights lookup that fails must not hide them
        facts["weights"] = _weights()
    except Exception as e:
        facts["weights"] = {"error": first_line(e)}
    return facts


def _tiny_graph() -> bytes:
    """x [1, 1, 4, 4] -> Conv with weight 2 (cuDNN) -> MatMul with the identity (cuBLAS): y = 2x."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 2, np.float32), "w")
    eye = numpy_helper.from_array(np.eye(4, dtype=np.float32), "eye")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("MatMul", ["c", "eye"], ["y"])]
    graph = helper.make_graph(nodes, "doctor", [x], [y], [w, eye])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime 1.14 and newer open
    return model.SerializeToString()


def _run_tiny(ort: Any, providers: list, strict: bool) -> str:
    """Open the tiny graph, run it once, check y = 2x; returns the provider that ran it."""
    import numpy as np

    opts = ort.SessionOptions()
    if strict:  # otherwise onnxruntime quietly runs on CPU when CUDA cannot start
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    session = ort.InferenceSession(_tiny_graph(), opts, providers=providers)
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    y = session.run(None, {"x": x})[0]
    if not np.allclose(y, 2 * x):
        raise RuntimeError(f"wrong result {y.ravel()[:4].tolist()} for {(2 * x).ravel()[:4].tolist()}")
    return session.get_providers()[0]


def _probe_onnxruntime() -> dict:
    ort = onnxruntime()

    facts: dict[str, Any] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    try:
        from onnxruntime.capi import build_and_package_info as info

        facts["package"], facts["cuda"] = getattr(info, "package_name", ""), getattr(info, "cuda_version", "") or None
    except ImportError:
        facts["package"], facts["cuda"] = "", None
    try:  # the same graph on CPU: a CUDA failure below is then CUDA's, not the graph's
        _run_tiny(ort, ["CPUExecutionProvider"], strict=False)
        facts["cpu_session"] = "ok"
    except Exception as e:
        facts["cpu_session"] = f"fails: {first_line(e)}"
    if "CUDAExecutionProvider" not in facts["providers"]:
        facts["cuda_session"] = {"ok": False, "error": "this onnxruntime has no CUDAExecutionProvider"}
        return facts
    facts["preload_dlls"] = "absent (onnxruntime < 1.21)"
    if hasattr(ort, "preload_dlls"):
        try:  # as `artscale generate` opens sessions: CUDA and cuDNN from the nvidia-* wheels, no torch import
            ort.preload_dlls()
            facts["preload_dlls"] = "ok"
        except Exception as e:
            facts["preload_dlls"] = f"fails: {first_line(e)}"
    try:
        used = _run_tiny(ort, ["CUDAExecutionProvider"], strict=True)
        ok = used == "CUDAExecutionProvider"
        facts["cuda_session"] = {"ok": ok, "error": "" if ok else f"onnxruntime chose {used}"}
    except Exception as e:  # Fail: fallback disabled, a missing libcudnn, CUDNN_STATUS_...: onnxruntime's words
        facts["cuda_session"] = {"ok": False, "error": first_line(e)}
    return facts


def _weights() -> dict:
    """Where training and `artscale eval` look for their weights (the code they use) and whether a file is there."""
    import torch

    from artscale.metrics.fid import inception_cache
    from artscale.train.losses import VGG_FILE

    vgg = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
    inception = inception_cache()
    return {
        "vgg16": {"path": str(vgg), "found": vgg.is_file()},
        "inception": {"path": str(inception), "found": inception.is_file()},
    }


PROBES = {"torch": _probe_torch, "onnxruntime": _probe_onnxruntime}


if __name__ == "__main__":
    print(json.dumps(PROBES[sys.argv[1]]()), flush=True)

"""Small facts about the process and sizes that every stage asks."""

import os
from typing import Any


def multiple_of_8(value: int) -> bool:
    """A size the model gives back unchanged: it halves the image 3 times, then doubles it 3 times."""
    return value > 0 and value % 8 == 0


def usable_cores() -> int:
    """The CPUs this process may run on: a SLURM allocation or a taskset, not the whole machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def onnxruntime() -> Any:
    """onnxruntime, imported with its telemetry off: since 1.29 the official Linux wheels write a device
    id under ~/.cache/Microsoft/DeveloperTools/ when imported and upload usage events (microsoft/onnxruntime
    #27379). ORT_DISABLE_TELEMETRY=1 before the import is the full opt-out (#29843); the API call covers
    a process that imported it earlier. A user who sets the variable keeps their choice."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    ort.disable_telemetry_events()
    return ort

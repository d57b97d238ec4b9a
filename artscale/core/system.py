"""Small facts about the process and sizes that every stage asks."""

import os


def multiple_of_8(value: int) -> bool:
    """A size the model gives back unchanged: it halves the image 3 times, then doubles it 3 times."""
    return value > 0 and value % 8 == 0


def usable_cores() -> int:
    """The CPUs this process may run on: a SLURM allocation or a taskset, not the whole machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

"""Fixtures of the SLURM tests: a SLURM that answers (the local cluster, started when it is down), and
submitting, waiting for and reading back jobs on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parents[1]
CLUSTER_DIR = Path(os.environ.get("ARTSCALE_SLURM_DIR", "/tmp/artscale-slurm"))
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
}


@pytest.fixture(scope="session")
def slurm():
    """A SLURM that answers: $SLURM_CONF if set, else the local cluster (started when it is down).

    Outside CI a machine without SLURM skips these tests; with CI=true they fail instead, so a
    green CI always means they ran."""
    if not shutil.which("sbatch") and os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but sbatch is not installed: a green CI must have run the SLURM tests")
    if not shutil.which("sbatch"):
        pytest.skip(
            "sbatch not found: SLURM is not installed here (slurm/local-cluster.sh up installs Debian's slurm-wlm)"
        )
    if "SLURM_CONF" not in os.environ:
        os.environ["SLURM_CONF"] = str(CLUSTER_DIR / "slurm.conf")
        if (
            subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode != 0
            or not (CLUSTER_DIR / "slurm.conf").is_file()
        ):
            up = subprocess.run(
                [str(ROOT / "slurm" / "local-cluster.sh"), "up"], capture_output=True, text=True, timeout=300
            )
            if up.returncode == 3 and os.environ.get("CI", "").lower() != "true":
                pytest.skip(f"sbatch is here but slurmctld/slurmd cannot be installed: {up.stderr.strip()}")
            assert up.returncode == 0, f"slurm/local-cluster.sh up failed:\n{up.stdout}{up.stderr}"
    os.environ["ARTSCALE_VENV"] = str(VENV)
    return os.environ["SLURM_CONF"]


def sbatch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> list[dict[str, str]]:
    """`scontrol show job` as one dict per record (an array has one per task); [] once SLURM forgets it."""
    out = subprocess.run(["scontrol", "show", "-o", "job", job], capture_output=True, text=True)
    records = []
    for line in out.stdout.splitlines():
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if "JobState" in fields:
            records.append(fields)
    return records


def wait_job(job: str, timeout: float, until=None) -> list[dict[str, str]]:
    """Poll every 0.5 s (sbatch --wait polls slowly; there is no sacct) until every record has
    left the active states, or `until(records)` holds."""
    deadline = time.monotonic() + timeout
    records: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = job_info(job)
        if records and (until(records) if until else all(r["JobState"] not in ACTIVE for r in records)):
            return records
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    pytest.fail(
        f"job {job} not done after {timeout:.0f} s: {[(r.get('JobId'), r['JobState'], r.get('Reason')) for r in records]}"
    )


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("report")
    }


@pytest.fixture(name="sbatch", scope="session")
def sbatch_fixture():
    """`sbatch --parsable ARGS` in `cwd`: the job id."""
    return sbatch


@pytest.fixture(name="job_info", scope="session")
def job_info_fixture():
    return job_info


@pytest.fixture(name="wait_job", scope="session")
def wait_job_fixture():
    return wait_job


@pytest.fixture(name="tree_files", scope="session")
def tree_files_fixture():
    """Path -> bytes of every file below a folder but its reports."""
    return tree_files

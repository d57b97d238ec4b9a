"""What a partition's nodes have (sinfo), and a job's request checked and fitted against them.

SLURM accepts a job that no node of its partition can ever run (more cores or GPUs per node than
any node has) and leaves it pending for good (reason PartitionConfig), with the merge job waiting
behind it. So `artscale submit` compares its request with the nodes first: a default the user did
not choose is lowered to what the nodes have (one line on stderr), an explicit flag that no node
can meet is refused in one line. Where sinfo is missing or does not answer, nothing is checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from artscale.core.errors import UserError

CPUS_PER_GPU = 8  # `artscale submit --cpus-per-gpu`: cores per GPU for loader workers or decoders
# One line per (node, partition): `sinfo --Node` never summarizes nodes of different sizes into one line.
SINFO = ["sinfo", "--noheader", "--Node", "--all", "--format=%P|%N|%c|%m|%G"]
SINFO_TIMEOUT_S = 15  # a client without a config retries for a minute; a dead controller answers in ~10 s


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    gpus: int  # the gpu GRES of the node, all types together
    mem_mb: int


@dataclass(frozen=True)
class Partition:
    name: str  # the partition asked for, or the default one ('' when there is none)
    nodes: tuple[Node, ...]  # empty when sinfo does not list `name`
    known: tuple[str, ...]  # every partition sinfo lists


def gres_gpus(gres: str) -> int:
    """GPUs in a node's GRES: `gpu:8` -> 8, `gpu:a100:4(S:0-1),mps:400` -> 4, `(null)` -> 0."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu":
            continue
        count = parts[-1] if len(parts) > 1 else "1"
        total += int(count) if count.isdigit() else 1  # `gpu:a100` (a type, no count) is one
    return total


def parse_sinfo(text: str, partition: str = "") -> Partition:
    """The nodes of `partition` (a comma list: all of theirs) or of the default one, from SINFO's output."""
    nodes: dict[str, dict[str, Node]] = {}
    default = ""
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        part, name, cpus, mem, gres = fields
        if part.endswith("*"):
            part = default = part[:-1]
        nodes.setdefault(part, {})[name] = Node(name, _int(cpus), gres_gpus(gres), _int(mem))
    names = [p for p in partition.split(",") if p] if partition else [default] if default else []
    if not names or any(p not in nodes for p in names):
        return Partition(partition, (), tuple(nodes))
    found = {n.name: n for p in names for n in nodes[p].values()}
    return Partition(",".join(names), tuple(found.values()), tuple(nodes))


def _int(field: str) -> int:
    digits = re.match(r"\d+", field.strip())
    return int(digits.group()) if digits else 0


def partition_nodes(partition: str = "") -> Partition | None:
    """What sinfo says of `partition` (or of the default partition); None where sinfo is missing or does not answer."""
    if not shutil.which("sinfo"):
        return None
    try:
        out = subprocess.run(SINFO, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return parse_sinfo(out.stdout, partition)


def fit_request(
    part: Partition,
    *,
    cpus: int,
    cpus_flag: str = "",
    cpus_name: str = "--cpus-per-task",
    gpus: int = 0,
    gpus_flag: str = "--gpus-per-task",
    nodes: int = 1,
    mem_mb: int = 0,
    mem_arg: str = "",
) -> tuple[int, str]:
    """The CPUs per task to ask for, and a note when a default was lowered ('' otherwise).

    `cpus` is what the job is about to ask per task (per node for train); `cpus_flag` is the flag
    that set it (`--cpus-per-task`, `--cpus-per-gpu`), '' for a default; `cpus_name` what the user calls
    --cpus-per-task on this command line ('' where there is no such flag). `nodes` nodes with `gpus`
    GPUs and `mem_mb` memory each must exist, and each must have the CPUs: a default is lowered
    to what they have, anything else the user asked for that no node has raises UserError.
    """
    if not part.nodes:
        return cpus, ""
    where = f"partition {part.name}"
    if gpus:
        most = max(n.gpus for n in part.nodes)
        if most == 0:
            raise UserError(
                f"{gpus_flag} {gpus}: no node of {where} has a GPU (no gpu GRES); "
                f"pass --partition with GPU nodes, or leave out {gpus_flag} to run on CPUs"
            )
        if gpus > most:
            raise UserError(
                f"{gpus_flag} {gpus}: no node of {where} has more than {most} GPUs; pass {gpus_flag} {most} or less"
            )
    fit = [n for n in part.nodes if n.gpus >= gpus]
    with_gpus = f" with {gpus} GPU{'s' if gpus > 1 else ''}" if gpus else ""
    if mem_mb:
        most = max(n.mem_mb for n in fit)
        if mem_mb > most:
            raise UserError(
                f"{mem_arg}: no node of {where}{with_gpus} has more than {most} MB of memory; pass --sbatch-arg=--mem={most}M or less"
            )
        fit = [n for n in fit if n.mem_mb >= mem_mb]
    if nodes > len(fit):
        raise UserError(
            f"--nodes {nodes}: {where} has {len(fit)} node{'s' if len(fit) != 1 else ''}{with_gpus}; "
            f"pass --nodes {len(fit)} or less"
        )
    room = sorted((n.cpus for n in fit), reverse=True)[nodes - 1]
    if cpus <= room:
        return cpus, ""
    who, has = ("no node", "has") if nodes == 1 else (f"fewer than {nodes} nodes", "have")
    short = f"{who} of {where}{with_gpus} {has} more than {room} CPUs"
    if cpus_flag == "--cpus-per-task":
        raise UserError(f"{cpus_name} {cpus}: {short}; pass {cpus_name} {room} or less")
    if cpus_flag == "--cpus-per-gpu":
        fix = f"--cpus-per-gpu {room // gpus}" if room >= gpus else f"{cpus_name} {room}"
        raise UserError(f"--cpus-per-gpu {cpus // gpus} ({cpus} CPUs): {short}; pass {fix} or less")
    choose = f" ({cpus_name} to choose)" if cpus_name else ""
    return room, f"{short}: asking for --cpus-per-task={room} instead of the default {cpus}{choose}"


def script_cpus(script: Path) -> int:
    """The `#SBATCH --cpus-per-task=N` of an sbatch script (1 when it has none, as SLURM assumes)."""
    found = re.search(r"^#SBATCH\s+--cpus-per-task[= ](\d+)", script.read_text(), re.MULTILINE)
    return int(found.group(1)) if found else 1


def _last_value(args: Sequence[str], option: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(option + "=")]
    return values[-1] if values else ""


def parse_mem_mb(value: str) -> int:
    """sbatch's --mem in MB (`64G`, `500M`, `2048`); 0 for `0` (all of a node) or what sbatch would refuse itself."""
    found = re.fullmatch(r"(\d+)([KMGT]?)B?", value.strip(), re.IGNORECASE)
    if not found:
        return 0
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[found.group(2).upper()]
    return int(int(found.group(1)) * scale)


def fit_submission(
    opts: dict, *, script: Path, gpus_flag: str, dry_run: bool = False, cpus_name: str = "--cpus-per-task"
) -> dict:
    """`artscale submit`'s options with --cpus-per-task fitted to the partition (see fit_request; `cpus_name`
    is the flag that sets opts["cpus_per_task"] on the command line, for its messages).

    opts["cpus_per_gpu"] None means the default, which may be lowered; any value the user gave is
    checked. An unknown partition is refused, except with --dry-run (lines for another cluster):
    there one line says that nothing was checked.
    """
    opts = dict(opts)
    if opts.get("cpus_per_gpu") is None:
        opts.pop("cpus_per_gpu", None)
    sbatch_args = opts.get("sbatch_args", ())
    gpus = opts.get(gpus_flag[2:].replace("-", "_"), 0)
    per_gpu, nodes = opts.get("cpus_per_gpu", CPUS_PER_GPU), opts.get("nodes", 1)
    if gpus < 0 or per_gpu < 1 or nodes < 1 or opts.get("cpus_per_task", 0) < 0:
        return opts  # the sbatch line's builder says what is wrong
    asked = _last_value(sbatch_args, "--partition") or opts.get("partition") or os.environ.get("SBATCH_PARTITION", "")
    part = partition_nodes(asked)
    if part is None or (not part.nodes and not part.name):  # no sinfo, or no default partition: sbatch decides
        return opts
    if not part.nodes:
        listed = f"sinfo lists {', '.join(part.known) or 'none'}"
        if dry_run:
            print(f"artscale: partition {part.name} is not on this cluster ({listed}): not checked", file=sys.stderr)
            return opts
        raise UserError(f"partition {part.name} is not on this cluster ({listed}); pass --partition with one of them")
    if opts.get("cpus_per_task"):
        cpus, flag = opts["cpus_per_task"], "--cpus-per-task"
    elif gpus:
        cpus, flag = gpus * per_gpu, "--cpus-per-gpu" if "cpus_per_gpu" in opts else ""
    else:
        cpus, flag = script_cpus(script), ""
    mem = _last_value(sbatch_args, "--mem")
    fitted, note = fit_request(
        part,
        cpus=cpus,
        cpus_flag=flag,
        cpus_name=cpus_name,
        gpus=gpus,
        gpus_flag=gpus_flag,
        nodes=nodes,
        mem_mb=parse_mem_mb(mem),
        mem_arg=f"--sbatch-arg=--mem={mem}",
    )
    if note:
        print(f"artscale: {note}", file=sys.stderr)
        opts["cpus_per_task"] = fitted
    return opts

"""This module is the SLURM glue: launch lines, signal forwarding, sbatch lines and the node-side entry.

The per-node `accelerate launch` line, the signal relay, and the merge job's entry (the merge itself
is artscale.infer.outputs's, for generate's shards and sample's alike).

The sbatch scripts (artscale/cluster/sbatch/, shipped with the package) stay thin and call
`python -m artscale.cluster ...` for anything a test should check: the launch line is a pure
function (`accelerate_launch_command`), so what 2 nodes x 8 GPUs start is asserted without a cluster. `artscale submit` builds the sbatch
lines (also pure functions) and submits them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from artscale.cluster.nodes import CPUS_PER_GPU, fit_submission
from artscale.core.errors import UserError

# Package data, so an installed artscale submits them as a checkout does. sbatch copies a script
# when it submits it: the job never reads this folder.
SBATCH_DIR = Path(__file__).resolve().parent / "sbatch"
# What every rank runs: the module, not a file, so it is found wherever artscale is installed.
TRAIN_MODULE = "artscale.train"


def accelerate_launch_command(
    *,
    num_machines: int,
    machine_rank: int,
    processes_per_machine: int,
    main_ip: str,
    main_port: int,
    mixed_precision: str = "no",
    use_gpu: bool = True,
    module: str = TRAIN_MODULE,
    script_args: Sequence[str] = (),
    accelerate: str = "accelerate",
) -> tuple[list[str], dict[str, str]]:
    """The command one machine runs, and the environment it needs on top of its own.

    Every machine runs the same line except `--machine_rank`. `--rdzv_backend static`: SLURM
    fixes the machines and their ranks before anything starts, so there is nothing to elect.
    CPU ranks: accelerate 1.15's `--cpu` never starts more than one process, so a CPU job is
    `--multi_gpu` with ACCELERATE_USE_CPU=1 (gloo).
    """
    if num_machines < 1 or processes_per_machine < 1:
        raise UserError(
            f"need at least 1 machine and 1 process per machine, got {num_machines} x {processes_per_machine}"
        )
    if not 0 <= machine_rank < num_machines:
        raise UserError(f"machine rank {machine_rank} is outside 0..{num_machines - 1}")
    total = num_machines * processes_per_machine
    cmd = [accelerate, "launch"]
    env: dict[str, str] = {}
    if not use_gpu:
        env["ACCELERATE_USE_CPU"] = "1"
        if total == 1:
            cmd.append("--cpu")
    if total > 1:
        cmd.append("--multi_gpu")
    cmd += ["--num_machines", str(num_machines), "--num_processes", str(total)]
    if num_machines > 1:
        cmd += [
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            main_ip,
            "--main_process_port",
            str(main_port),
            "--rdzv_backend",
            "static",
            "--same_network",
        ]
    # The launcher's flag only silences its default warning; the training process decides `auto` itself.
    launcher_precision = "no" if mixed_precision == "auto" else mixed_precision
    cmd += ["--mixed_precision", launcher_precision, "--dynamo_backend", "no", "-m", module, *script_args]
    return cmd, env


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[01-04]` -> `node01`), as scontrol expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    except OSError as e:  # scontrol missing (not a SLURM node) or not executable
        raise UserError(
            f"cannot run scontrol to find the first host of {nodelist!r} ({e.strerror or e}); set ARTSCALE_MAIN_ADDR"
        ) from None
    hosts = out.stdout.split() if out.returncode == 0 else []
    if not hosts:
        said = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise UserError(f"scontrol could not expand the node list {nodelist!r} ({said}); set ARTSCALE_MAIN_ADDR")
    return hosts[0]


def gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs this task may use: ARTSCALE_GPUS_PER_NODE, else what SLURM granted, else CUDA_VISIBLE_DEVICES."""
    for key in ("ARTSCALE_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        if env.get(key, "").strip():
            return int(env[key])
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    return len([d for d in visible.split(",") if d]) if visible and visible != "-1" else 0


def main_port(env: Mapping[str, str]) -> int:
    """ARTSCALE_MAIN_PORT, else a port picked from the job id, so two jobs on one host do not collide."""
    if env.get("ARTSCALE_MAIN_PORT", "").strip():
        return int(env["ARTSCALE_MAIN_PORT"])
    return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def node_launch_command(
    env: Mapping[str, str], main_ip: str, train_args: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """The launch line for this srun task, from the SLURM environment it runs in.

    One srun task per machine: `SLURM_NTASKS` machines, this one is `SLURM_PROCID`. With
    `--ntasks-per-node=1` that is the node's rank (`SLURM_NODEID`); using the task id instead
    also lets one node play two machines, which is how the tests run it on one host.
    """
    from artscale.train.config import load_config

    config, overrides = _split_train_args(train_args)
    cfg = load_config(config, overrides)
    gpus = gpus_on_node(env)
    per_machine = gpus if gpus > 0 else int(env.get("ARTSCALE_CPU_PROCESSES", "1"))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    return accelerate_launch_command(
        num_machines=int(env.get("SLURM_NTASKS", "1")),
        machine_rank=int(env.get("SLURM_PROCID", "0")),
        processes_per_machine=per_machine,
        main_ip=main_ip,
        main_port=main_port(env),
        mixed_precision=cfg.mixed_precision,
        use_gpu=gpus > 0,
        script_args=train_args,
        accelerate=accelerate,
    )


def _split_train_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--config FILE` (or `--config=FILE`) and the key=value overrides, as `python -m artscale.train` reads them."""
    config, rest, it = None, [], iter(args)
    for a in it:
        if a == "--config":
            config = next(it, None)
            if config is None:
                raise UserError("--config needs a file")
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        else:
            rest.append(a)
    return config, rest


def _children(pid: int) -> list[int]:
    """Direct children of pid (the training ranks of an `accelerate launch`); [] once it is gone.

    Direct only, as the launcher starts the ranks: a rank's own children (its loader workers) are
    forked with its USR1 handler in place and would pass for ranks, but the stop request is the
    rank's to act on."""
    import psutil  # here, not at the top: `artscale --help` imports this module

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _catches(pid: int, signum: int) -> bool:
    """Has process pid installed a handler for signum? Read from SigCgt in /proc/PID/status:
    psutil has no call for a process's caught-signal mask (its Process offers signals to send, not
    the handlers installed)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def run_node(train_args: Sequence[str]) -> int:
    """Run this machine's `accelerate launch`, passing USR1/TERM on to the training ranks (see `relay`)."""
    env = dict(os.environ)
    main_ip = env.get("ARTSCALE_MAIN_ADDR", "").strip() or (
        first_host(env["SLURM_JOB_NODELIST"]) if env.get("SLURM_JOB_NODELIST") else "127.0.0.1"
    )
    cmd, extra = node_launch_command(env, main_ip, train_args)
    rank = env.get("SLURM_PROCID", "0")
    print(f"artscale: machine {rank}: {' '.join(cmd)}", flush=True)
    return relay(cmd, {**env, **extra}, rank)


def relay(cmd: Sequence[str], env: Mapping[str, str], rank: str = "0") -> int:
    """Run cmd; pass each USR1/TERM this process gets on to cmd's children once they catch it.

    SLURM signals every process of the step, the launcher included, and SIGUSR1's default
    action would kill the launcher (and with it the srun task, while its ranks are still writing
    their checkpoint). So the launcher starts with SIGUSR1 ignored, and the ranks inherit that
    until they install their own handler. A stop request is passed on to each rank once, as
    soon as it has that handler: one that comes while the ranks are still starting is not lost.
    """
    pending: set[int] = set()
    delivered: set[tuple[int, int]] = set()
    stops = {signal.SIGUSR1, signal.SIGTERM}
    # Held back (blocked, not ignored) until the handler below is in place: a signal that comes
    # meanwhile waits, then reaches the handler. train.sbatch starts this process with them blocked
    # already (env --block-signal), which covers Python's start-up too. The launcher gets them
    # unblocked, with USR1 ignored.
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        for sig in stops:
            signal.signal(sig, lambda signum, _frame: pending.add(signum))

        def launcher_signals() -> None:  # in the child, between fork and exec
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)

        launcher = subprocess.Popen(list(cmd), env=dict(env), preexec_fn=launcher_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    while True:
        try:
            return launcher.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        for signum in sorted(pending):
            ready = [kid for kid in _children(launcher.pid) if (kid, signum) not in delivered and _catches(kid, signum)]
            if ready:
                print(f"artscale: machine {rank}: {signal.Signals(signum).name} -> training ranks {ready}", flush=True)
            for kid in ready:
                try:
                    os.kill(kid, signum)
                except ProcessLookupError:
                    pass
                delivered.add((kid, signum))


def run_finished(train_args: Sequence[str]) -> bool:
    """Has this run reached its last step? Then a job must not requeue itself.

    True when run_dir/final exists and is at least as new as the newest checkpoint (a run
    extended with a larger max_steps after it finished once has newer checkpoints than final/).
    """
    from artscale.contracts.run_dir import STATE_NAME, list_checkpoints
    from artscale.contracts.run_files import read_state
    from artscale.train.config import load_config

    config, overrides = _split_train_args(train_args)
    run_dir = Path(load_config(config, overrides).run_dir)
    state = read_state(run_dir / "final" / STATE_NAME)
    if state is None:
        return False
    found = list_checkpoints(run_dir)
    return state["step"] >= (found[-1][0] if found else 0)


@dataclass(frozen=True)
class Placement:
    """Where and for how long every job of a submission runs: `artscale submit`'s cluster flags."""

    time_limit: str = ""  # "" : the script's own
    partition: str = ""
    account: str = ""
    sbatch_args: Sequence[str] = ()  # more sbatch options, as given

    @classmethod
    def take(cls, opts: dict) -> Placement:
        """The placement flags popped out of `artscale submit`'s options."""
        return cls(**{f.name: opts.pop(f.name) for f in fields(cls) if f.name in opts})

    def options(self, timed: bool = True) -> list[str]:
        """The sbatch options; `timed` False for the short jobs (listing, merge) that keep their script's limit."""
        opts = [f"--time={self.time_limit}"] if timed and self.time_limit else []
        opts += [f"--partition={self.partition}"] if self.partition else []
        opts += [f"--account={self.account}"] if self.account else []
        return opts + list(self.sbatch_args)


def train_sbatch_command(
    train_args: Sequence[str],
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    cpu_processes: int = 1,
    cpus_per_task: int = 0,
    cpus_per_gpu: int = CPUS_PER_GPU,
    signal_seconds: int = 300,
    placement: Placement = Placement(),
) -> list[str]:
    """The `sbatch` line for train.sbatch: N nodes x G GPUs (or CPU ranks when G is 0).

    One srun task per node runs all its ranks, so with GPUs the task asks for G x cpus_per_gpu
    cores: each rank's loader workers get cores of their own (unless --cpus-per-task says otherwise).
    """
    if nodes < 1 or gpus_per_node < 0 or cpu_processes < 1 or signal_seconds < 0 or cpus_per_gpu < 1:
        raise UserError(
            "--nodes, --cpu-processes and --cpus-per-gpu must be >= 1, --gpus-per-node and --signal-seconds >= 0"
        )
    cmd = ["sbatch", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if gpus_per_node:
        cmd.append(f"--gpus-per-node={gpus_per_node}")
        cpus_per_task = cpus_per_task or gpus_per_node * cpus_per_gpu
    else:
        cmd.append(f"--export=ALL,ARTSCALE_CPU_PROCESSES={cpu_processes}")
    cmd += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    cmd += [f"--signal=B:USR1@{signal_seconds}"] if signal_seconds else []
    return [*cmd, *placement.options(), str(SBATCH_DIR / "train.sbatch"), *train_args]


def _array(tasks: int, max_running: int, gpus_per_task: int, cpus_per_task: int, cpus_per_gpu: int) -> list[str]:
    """`--array=0-(K-1)[%N]` and the resources of one task (gpus x cpus_per_gpu cores on a GPU)."""
    if tasks < 1 or max_running < 0 or cpus_per_gpu < 1:
        raise UserError(f"--tasks {tasks}: need at least 1 task (and --max-running >= 0, --cpus-per-gpu >= 1)")
    cmd = [f"--array=0-{tasks - 1}" + (f"%{max_running}" if max_running else "")]
    cmd += [f"--gpus-per-task={gpus_per_task}"] if gpus_per_task else []
    cpus_per_task = cpus_per_task or gpus_per_task * cpus_per_gpu
    return cmd + ([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else [])


def _device(args: Sequence[str], gpus_per_task: int) -> list[str]:
    """--device cuda on GPU tasks (fail rather than run on CPU), auto otherwise, unless the user said."""
    return [] if any(a.startswith("--device") for a in args) else ["--device", "cuda" if gpus_per_task else "auto"]


def array_sbatch_commands(
    what: Literal["generate", "sample"],
    model: str,
    out_dir: str,
    *,
    tasks: int,
    in_dir: str = "",
    count: int = 0,
    max_running: int = 0,
    gpus_per_task: int = 0,
    cpus_per_task: int = 0,
    cpus_per_gpu: int = CPUS_PER_GPU,
    script_args: Sequence[str] = (),
    placement: Placement = Placement(),
) -> list[list[str]]:
    """The sbatch lines of `artscale submit generate|sample`: K tasks of generate.sbatch (`artscale
    generate MODEL IN_DIR OUT_DIR` or `artscale sample MODEL OUT_DIR --count N`, then script_args),
    and the merge job after the array (`{array}`: its job id). A generation first runs a listing job
    (one walk of IN_DIR) that the array waits for (`{listing}`).

    A task on a GPU asks for gpus x cpus_per_gpu cores: the decoders and encoders (PNG encoding for
    sample) that keep one GPU fed need several cores."""
    sample = what == "sample"
    array = _array(tasks, max_running, gpus_per_task, cpus_per_task, cpus_per_gpu)
    command = ["sample", model, out_dir, "--count", str(count)] if sample else [model, in_dir, out_dir]
    args = [*command, *_device(script_args, gpus_per_task), *script_args]
    after_listing = [] if sample else ["--dependency=afterok:{listing}"]
    # the scripts name their jobs after generate; a sampling array says what it is
    named, merge_named = (["--job-name=artscale-sample"], ["--job-name=artscale-sample-merge"]) if sample else ([], [])
    common, untimed = placement.options(), placement.options(timed=False)
    cmd = ["sbatch", *after_listing, *array, *named, *common, str(SBATCH_DIR / "generate.sbatch"), *args]
    merge = ["sbatch", "--dependency=afterok:{array}", *merge_named, *untimed]
    merge += [str(SBATCH_DIR / "generate-merge.sbatch"), out_dir, str(tasks), *(["--sample"] if sample else [])]
    if sample:
        return [cmd, merge]
    return [["sbatch", *untimed, str(SBATCH_DIR / "generate-list.sbatch"), *args], cmd, merge]


def sbatch_parsable(cmd: Sequence[str]) -> str:
    """Submit one sbatch line (`sbatch --parsable`): the job id."""
    if not shutil.which("sbatch"):
        raise UserError("sbatch not found: run this on a SLURM login node (or see the commands with --dry-run)")
    out = subprocess.run([cmd[0], "--parsable", *cmd[1:]], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(
            f"sbatch refused the job: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
        )
    return out.stdout.strip().split(";")[0]


def submit(what: str, opts: dict, dry_run: bool = False) -> list[str]:
    """`artscale submit train|generate|sample`: submit (or print, with dry_run) the sbatch lines; the job ids."""
    import shlex

    if what == "train":
        from artscale.train.config import load_config

        load_config(*_split_train_args(opts["train_args"]))  # a typo fails now, not after hours in the queue
    # A job no node of its partition can run would pend for good: fit it to the nodes, or refuse.
    script, gpus_flag = (
        ("train.sbatch", "--gpus-per-node") if what == "train" else ("generate.sbatch", "--gpus-per-task")
    )
    opts = fit_submission(opts, script=SBATCH_DIR / script, gpus_flag=gpus_flag, dry_run=dry_run)
    placement = Placement.take(opts)
    if what == "train":
        cmds = [train_sbatch_command(**opts, placement=placement)]
    else:
        cmds = array_sbatch_commands(what, **opts, placement=placement)
    if dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        return []
    ids: list[str] = []
    for cmd, after in zip(cmds, ("", "{array}") if what == "sample" else ("", "{listing}", "{array}")):
        ids.append(sbatch_parsable([a.replace(after, ids[-1]) if after else a for a in cmd]))
    if what == "sample":
        print(f"submitted sampling array {ids[0]} ({opts['tasks']} tasks), then merge job {ids[1]} (after all succeed)")
    elif what == "generate":
        print(
            f"submitted listing job {ids[0]}, then generation array {ids[1]} ({opts['tasks']} tasks), "
            f"then merge job {ids[2]} (each after the one before succeeds)"
        )
    else:
        print(f"submitted training job {ids[0]}")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    """Entry for the sbatch scripts: `python -m artscale.cluster node|finished|merge ...`."""
    p = argparse.ArgumentParser(
        prog="python -m artscale.cluster", description="what the sbatch scripts run on the nodes"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    node = sub.add_parser("node", help="run this machine's accelerate launch (one srun task per machine)")
    node.add_argument("train_args", nargs=argparse.REMAINDER)
    fin = sub.add_parser("finished", help="exit 0 when the run has reached its last step")
    fin.add_argument("train_args", nargs=argparse.REMAINDER)
    merge = sub.add_parser("merge", help="merge per-shard generation reports into OUT/report.json")
    merge.add_argument("out_dir", type=Path)
    merge.add_argument("--num-shards", type=int, required=True)
    merge.add_argument("--sample", action="store_true", help="the reports of `artscale sample`, not generate")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["node"], ["finished"]) and argv[1:] not in (["-h"], ["--help"]):
        # all of it is training's: argparse's REMAINDER refuses one that starts with a flag (--config)
        args = argparse.Namespace(cmd=argv[0], train_args=argv[1:])
    else:
        args = p.parse_args(argv)
    try:
        if args.cmd == "node":
            return run_node(args.train_args)
        if args.cmd == "finished":
            return 0 if run_finished(args.train_args) else 1
        from artscale.infer.outputs import write_merged

        merged = write_merged(args.out_dir, args.num_shards, sample=args.sample)
        if args.sample:
            print(f"artscale: merged {args.num_shards} reports: {merged['images_in_run']} images, all present")
            return 0
        print(
            f"artscale: merged {args.num_shards} reports: {merged['inputs_seen']} inputs, {merged['written']} written, "
            f"{merged['already_done']} already done, {merged['skipped']} skipped, {merged['ignored']} ignored"
        )
        if merged["after_listing"]:
            print(
                f"artscale: warning: {merged['after_listing']} files came into {merged['in_dir']} after the listing "
                f"and were not generated (e.g. {merged['after_listing_files'][0]}); list and run again to add them",
                file=sys.stderr,
            )
        return 0
    except UserError as e:
        print(f"artscale: error: {e}", file=sys.stderr)
        return 2

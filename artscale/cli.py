"""This module is the `artscale` command line: it parses, then dispatches to the stage that does the work.

Commands: demo, pack, verify, train, export, generate, sample, info, submit, eval, report, configs, doctor.

A UserError anywhere becomes one line on stderr and exit code 2. Heavy imports (torch,
onnxruntime) happen inside the command that needs them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from artscale import __version__
from artscale.cluster.slurm import CPUS_PER_GPU
from artscale.core.entry import run_command
from artscale.core.errors import UserError
from artscale.core.system import multiple_of_8
from artscale.data.manifest import is_shards_dir
from artscale.data.store import check_url, is_url


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Intermixed(_Parser):
    """Positionals before, between and after the flags (`SRC --out DIR key=value`): plain argparse stops
    filling a positional list at the first flag. For parsers without subcommands of their own."""

    _mixing = False

    def parse_known_args(
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._mixing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def positive_multiple_of_8(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not multiple_of_8(value):
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 8 (the model pools 3 times)")
    return value


def _location(text: str) -> str | Path:
    """A folder, or a URL (s3://, gs://, https://, ...) checked here: a login in it is refused before it is used."""
    if not is_url(text):
        return Path(text)
    try:
        return check_url(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a generated sample collection")
    p.add_argument(
        "--out", type=Path, default=Path("artscale-demo"), help="where everything goes (default ./artscale-demo)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="steps of each training run, the article's and diffusion's (default: a few minutes each on CPU)",
    )


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack an image folder (class subfolders) into WebDataset shards")
    p.add_argument("src", type=Path, help="image folder with one subfolder per class")
    p.add_argument("out", type=_location, help="shards directory to write, or a URL: s3://bucket/prefix, gs://...")
    _pack_settings(p)
    p.add_argument("--force", action="store_true", default=False, help="start over, discarding shards already in OUT")


def _pack_settings(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> list[argparse.Action]:
    """Pack's settings, for `pack` and `submit pipeline`. Their defaults are PackSettings' (artscale/data/pack.py):
    a flag not given is not passed (SUPPRESS), which also lets the pipeline hand on exactly what was given."""
    flags = [
        p.add_argument("--size", type=positive_multiple_of_8, help="training image size (default 128)"),
        p.add_argument("--val-fraction", type=_fraction, help="share of files in the val split (default 0.05)"),
        p.add_argument("--workers", type=int, help="decode processes (default: all cores)"),
        p.add_argument("--classes", help="comma-separated class folders to pack (default: all)"),
        p.add_argument(
            "--resize", choices=["stretch", "center-crop"], help="to a square: stretch (default) or crop the centre"
        ),
        p.add_argument(
            "--format", dest="image_format", choices=["jpg", "png"], help="images in the shards (default jpg)"
        ),
        p.add_argument("--quality", type=int, help="JPEG quality (default 95)"),
        p.add_argument(
            "--max-pixels", type=int, help="skip larger images (default: Pillow's decompression-bomb limit)"
        ),
        p.add_argument("--min-size", type=int, help="skip images whose shorter side is smaller (default: off)"),
        p.add_argument("--follow-symlinks", action="store_true", help="pack symlinks that lead outside SRC"),
        p.add_argument("--shard-max-count", type=int, help="samples per shard (default 1000)"),
        p.add_argument("--shard-max-bytes", type=int, help="bytes per shard (default: no limit)"),
    ]
    for action in flags:
        action.default = argparse.SUPPRESS
    return flags


def _given(flags: list[argparse.Action], args: argparse.Namespace) -> list[str]:
    """The flags among `flags` that were given, as command-line arguments again."""
    given = []
    for action in flags:
        if action.dest in vars(args):
            value = getattr(args, action.dest)
            given += [action.option_strings[0]] + ([] if action.nargs == 0 else [str(value)])
    return given


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-check every shard against manifest.json")
    p.add_argument("shards", type=_location, help="a shards dir from `artscale pack`, or its URL")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (same code as: accelerate launch launch/train.py ...)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="[--config FILE|PRESET] [key=value ...]")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="checkpoint to ONNX (parity-checked), or a diffusion run to diffusers' format (--format)"
    )
    p.add_argument("source", type=Path, help="a run dir, a checkpoint, or an article .pth")
    p.add_argument("out", type=Path, help="the .onnx file to write (with --format diffusers: a folder)")
    p.add_argument(
        "--format",
        dest="export_format",
        choices=("onnx", "diffusers"),
        default="onnx",
        help="onnx (default), or diffusers: unet/, scheduler/ and a model card, for a diffusion run",
    )
    p.add_argument(
        "--grid-count",
        type=int,
        default=4,
        help="with --format diffusers: images per class in the model card's sample grid (default 4; 0: none)",
    )
    p.add_argument("--fp16", action="store_true", help="half precision weights and compute (I/O stays uint8)")
    p.add_argument(
        "--size", type=positive_multiple_of_8, default=0, help="training image size (needed for an article .pth)"
    )
    p.add_argument(
        "--shards", type=_location, default=None, help="val shards for the parity check (default: the run's data)"
    )
    p.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default=None,
        help="the EMA weights (default, where the run kept them) or raw",
    )


S = argparse.SUPPRESS  # a flag left out stays out of the namespace
VARIATION_KEYS = ("strength", "class_name", "class_from_parent", "steps", "sampler", "guidance", "seed")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="run an exported model over a directory tree")
    p.add_argument("model", type=Path, help="an .onnx file from `artscale export`")
    p.add_argument("in_dir", type=Path, help="folder of images, walked recursively")
    p.add_argument("out_dir", type=Path, help="where the mirrored tree and report.json go (not inside IN_DIR)")
    _add_run_flags(p)
    p.add_argument(
        "--provider",
        choices=["default", "tensorrt"],
        default="default",
        help="tensorrt: onnxruntime's TensorRT provider before CUDA, engines cached in OUT_DIR/.trt-cache "
        "(a GPU and TensorRT's libraries; without them it says so and runs on CUDA)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--size",
        type=positive_multiple_of_8,
        default=0,
        help="resize to this size (default: the model's training size)",
    )
    size.add_argument("--native", action="store_true", help="each image at its own size, rounded to a multiple of 8")
    p.add_argument("--max-side", type=positive_multiple_of_8, default=1024, help="cap for --native (default 1024)")
    p.add_argument("--restore-size", action="store_true", help="resize outputs back to each input's size")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images per onnxruntime call (default: 2 on CPU; on a GPU as many as fit in its memory, up to 64)",
    )
    p.add_argument("--workers", type=int, default=0, help="decode/encode threads (default: from the core count)")
    p.add_argument(
        "--follow-symlinks", action="store_true", help="generate for symlinks that lead outside IN_DIR, as pack does"
    )
    p.add_argument(
        "--list-only",
        action="store_true",
        help="walk IN_DIR once and write OUT_DIR/listing.jsonl, which the tasks of an array and the merge read",
    )
    d = p.add_argument_group("a diffusion model: variations of each image (img2img); docs/generate-and-sample.md")
    d.add_argument("--strength", type=float, default=S, help="0 keeps the input, 1 ignores it (default 0.6)")
    which = d.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_name", default=S, help="the class to vary towards (default: none)")
    which.add_argument(
        "--class-from-parent", action="store_true", default=S, help="each file's parent folder names its class"
    )
    d.add_argument("--steps", type=int, default=S, help="sampler steps over the whole schedule (default: the model's)")
    d.add_argument("--sampler", choices=["ddim", "dpm++"], default=S, help="default: the model's")
    d.add_argument("--guidance", type=float, default=S, help="classifier-free guidance (default: the model's)")
    d.add_argument("--seed", type=int, default=S, help="a file's noise comes from (seed, its relative path)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID and KID of a folder of generated images against a split of the shards")
    p.add_argument(
        "generated", type=Path, help="folder of images, walked recursively (class subfolders: per class too)"
    )
    p.add_argument("shards", type=_location, help="a shards dir from `artscale pack`, or its URL")
    p.add_argument("--split", choices=["val", "train"], default="val", help="the real images (default val)")
    p.add_argument("--out", type=Path, default=None, help="the JSON result (default GENERATED/eval.json)")
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="FILE",
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: from torch's hub cache)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per Inception-v3 batch (default 32)")
    p.add_argument("--kid-subsets", type=int, default=100, help="random subsets KID averages over (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="capped at the smaller set's size")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="new images from noise with a diffusion model (.onnx or run dir)")
    p.add_argument("model", type=Path, help="a diffusion .onnx from `artscale export`, or a diffusion run dir")
    p.add_argument("out_dir", type=Path, help="where the images (named by index) and report.json go")
    p.add_argument("--count", type=int, default=16, help="images (per class with --class all; default 16)")
    p.add_argument("--class", dest="class_name", default="all", help="a class name, or all: --count per class")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, from its run)")
    p.add_argument(
        "--sampler", choices=["ddim", "dpm++"], default=None, help="DPM-Solver++(2M) or DDIM (default: the model's)"
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (1: off; default: the model's)"
    )
    p.add_argument("--seed", type=int, default=0, help="image i starts from noise of (seed, i) alone")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default: 16 on CPU, 64 on a GPU)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="for a run dir: EMA (default) or raw")
    _add_run_flags(p)


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="what this machine can run: torch, CUDA, driver, onnxruntime, CPU, cores, weights"
    )
    p.add_argument("--need", choices=["cuda"], default=None, help="exit 2, naming the fix, unless CUDA really runs")
    p.add_argument("--json", action="store_true", help="the same facts as one JSON object")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a static HTML report (index.html + thumbnails) of a run dir or an output dir")
    p.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="a run dir, or an output dir of generate or sample (merged SLURM ones too); several: one section each",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the report folder (default: the first PATH's: RUN_DIR/report, or OUT_DIR-report beside it)",
    )


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """What `generate` and `sample` share: the device, the output format, the shard of the work."""
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="cuda: fail unless CUDA really runs"
    )
    p.add_argument("--allow-cpu-fallback", action="store_true", help="with --device cuda, run on CPU if CUDA cannot")
    p.add_argument(
        "--format",
        dest="image_format",
        choices=["png", "jpg", "webp"],
        default="png",
        help="output files (default png)",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG and WebP quality (default 95)")
    p.add_argument("--num-shards", type=int, default=None, help="default: $SLURM_ARRAY_TASK_COUNT or 1")
    p.add_argument(
        "--shard-index",
        type=int,
        default=None,
        help="default: the SLURM array task, ($SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN), or 0",
    )


def _shard(args: argparse.Namespace) -> tuple[int, int]:
    """--num-shards/--shard-index, defaulting to the SLURM array this task belongs to."""
    env = os.environ
    num_shards = args.num_shards if args.num_shards is not None else int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    # --array=1-4 or 0-10:2 numbers tasks from MIN by STEP: shard index = (ID - MIN) / STEP.
    task = (int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))) // int(
        env.get("SLURM_ARRAY_TASK_STEP", 1)
    )
    return num_shards, args.shard_index if args.shard_index is not None else task


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a shards dir (or its URL), run dir, checkpoint or .onnx holds")
    p.add_argument("path", type=_location, help="a shards dir (or its URL), run dir, checkpoint dir or .onnx file")


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="submit training or generation to SLURM (the packaged sbatch scripts), or print the sbatch lines"
    )
    what = p.add_subparsers(dest="what", required=True, parser_class=_Intermixed)

    def cluster_flags(q: argparse.ArgumentParser, of: str = "") -> None:
        """`of`: whose --time and --cpus-per-task they are, where a submission has several kinds of job."""
        q.add_argument(
            "--time", dest="time_limit", default="", help=f"time limit{of}, e.g. 24:00:00 (default: the script's)"
        )
        q.add_argument("--partition", default="", help="sbatch --partition (default: the cluster's default one)")
        q.add_argument("--account", default="", help="sbatch --account, the allocation to charge (default: yours)")
        q.add_argument(
            "--cpus-per-task",
            type=int,
            default=0,
            help=f"CPUs per task{of} (default: the script's, fit to the nodes)",
        )
        q.add_argument(
            "--sbatch-arg",
            dest="sbatch_args",
            action="append",
            default=[],
            metavar="ARG",
            help="one more sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)",
        )
        q.add_argument("--dry-run", action="store_true", help="print the sbatch line(s), submit nothing")

    t = what.add_parser("train", help="train.sbatch on N nodes x G GPUs (or CPU ranks); requeues on preemption")
    t.add_argument("--nodes", type=int, default=1, help="machines; one srun task (one accelerate launch) each")
    t.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks (gloo)")
    t.add_argument(
        "--cpu-processes",
        type=int,
        default=1,
        help="CPU ranks (gloo) per node when --gpus-per-node is 0 (default 1; sets ARTSCALE_CPU_PROCESSES)",
    )
    t.add_argument(
        "--cpus-per-gpu",
        type=int,
        default=None,
        help=f"cores per GPU for its loader workers (default {CPUS_PER_GPU})",
    )
    t.add_argument(
        "--signal-seconds", type=int, default=300, help="USR1 this long before the time limit: checkpoint, requeue"
    )
    t.add_argument("--config", default=None, help="a YAML file of training config keys, or a preset's name")
    t.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="training config keys")
    cluster_flags(t)
    g = what.add_parser("generate", help="generate.sbatch as a job array, then one merged report.json")
    g.add_argument("model", help="an .onnx file from `artscale export`")
    g.add_argument("in_dir", help="folder of images, walked once by the listing job")
    g.add_argument("out_dir", help="the mirrored tree, listing.jsonl and the merged report.json")
    g.add_argument("--tasks", type=int, required=True, help="array tasks = shards of the input tree")
    g.add_argument("--max-running", type=int, default=0, help="at most this many tasks at once (default: no limit)")
    g.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per array task (default 0: CPU)")
    g.add_argument(
        "--cpus-per-gpu",
        type=int,
        default=None,
        help=f"cores per GPU for the decoders and encoders feeding it (default {CPUS_PER_GPU})",
    )
    g.add_argument(
        "--generate-args", default="", help='more `artscale generate` flags, quoted: "--format jpg --batch-size 64"'
    )
    cluster_flags(g)
    sm = what.add_parser("sample", help="`artscale sample` as a job array (K shards of the indices), then the merge")
    sm.add_argument("model", help="a diffusion .onnx from `artscale export`, or a diffusion run dir")
    sm.add_argument("out_dir", help="the images, the shards' reports and the merged report.json")
    sm.add_argument("--count", type=int, required=True, help="images (per class unless --sample-args has --class)")
    sm.add_argument("--tasks", type=int, required=True, help="array tasks = shards of the images")
    sm.add_argument("--max-running", type=int, default=0, help="at most this many tasks at once (default: no limit)")
    sm.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per array task (default 0: CPU)")
    sm.add_argument(
        "--cpus-per-gpu",
        type=int,
        default=None,
        help=f"cores per GPU for encoding and writing (default {CPUS_PER_GPU})",
    )
    sm.add_argument(
        "--sample-args", default="", help='more `artscale sample` flags, quoted: "--class cubism --steps 30"'
    )
    cluster_flags(sm)
    _add_submit_pipeline(what, cluster_flags)


def _add_submit_pipeline(what: argparse._SubParsersAction, cluster_flags: Callable[..., None]) -> None:
    pl = what.add_parser(
        "pipeline",
        help="pack -> train -> export -> sample/generate arrays -> merges -> report, as dependent jobs",
        description="Each stage waits for the one before (afterok). Run it again after a failure or a cancel: "
        "it submits only what has not finished, and never a second copy of a job still queued.",
    )
    pl.add_argument("src", help="image folder with one subfolder per class")
    pl.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="training config keys")
    pl.add_argument("--config", required=True, help="a YAML file of training config keys, or a preset's name")
    pl.add_argument("--out", required=True, help="everything goes here: shards/ run/ model.onnx samples/ ...")
    pl.add_argument("--sample", type=int, default=0, metavar="COUNT", help="then sample COUNT images (per class)")
    pl.add_argument("--generate", default="", metavar="IN_DIR", help="then generate over this folder of images")
    pl.add_argument("--sample-args", default="", help='more `artscale sample` flags, quoted: "--steps 30"')
    pl.add_argument("--generate-args", default="", help="more `artscale generate` flags, quoted")
    pl.add_argument("--export-args", default="", help="more `artscale export` flags: --export-args=--fp16")
    pl.set_defaults(pack_flags=_pack_settings(pl.add_argument_group("pack's flags (`artscale pack`)")))
    pl.add_argument(
        "--pack-cpus", type=int, default=0, help="CPUs of the pack job (default: pack.sbatch's, fit to the nodes)"
    )
    t = pl.add_argument_group("training's placement (as `submit train`)")
    t.add_argument(
        "--nodes", type=int, default=1, help="machines for training; one srun task (one accelerate launch) each"
    )
    t.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks (gloo)")
    t.add_argument("--cpu-processes", type=int, default=1, help="CPU ranks per node when --gpus-per-node is 0")
    t.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the time limit")
    a = pl.add_argument_group("the arrays' placement (as `submit sample|generate`)")
    a.add_argument("--tasks", type=int, default=1, help="array tasks of sample and of generate (default 1)")
    a.add_argument("--max-running", type=int, default=0, help="at most this many tasks at once (default: no limit)")
    a.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per array task (default 0: CPU)")
    a.add_argument("--array-cpus-per-task", type=int, default=0, help="(default: generate.sbatch's, fit to the nodes)")
    a.add_argument("--array-time", default="", help="each task's time limit (default: generate.sbatch's)")
    pl.add_argument(
        "--cpus-per-gpu",
        type=int,
        default=None,
        help=f"cores per GPU, training's and the arrays' (default {CPUS_PER_GPU})",
    )
    cluster_flags(pl, of=" of training")  # --partition, --account, --sbatch-arg: every job's


def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="the packaged training presets (--config NAME takes one)")
    what = p.add_subparsers(dest="what", parser_class=_Parser)
    what.add_parser("show", help="print a preset, to copy and edit").add_argument("name", help="a preset's name")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="artscale", description="an art collection to a trained model, to ONNX, to generated images")
    parser.add_argument("--version", action="version", version=f"artscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_demo, _add_pack, _add_verify, _add_train, _add_export, _add_generate, _add_info, _add_submit):
        add(sub)
    _add_eval(sub)
    _add_sample(sub)
    _add_doctor(sub)
    _add_configs(sub)
    _add_report(sub)
    return parser


def _info(path: str | Path) -> str:
    if is_url(path):
        if not is_shards_dir(path):
            raise UserError(f"{path}: no manifest.json there (a URL is read as a shards dir from `artscale pack`)")
        from artscale.data.pack import describe_shards

        return describe_shards(path)
    if not path.exists():
        raise UserError(f"{path} not found")
    if path.suffix == ".onnx":
        from artscale.contracts.onnx import describe_onnx

        return describe_onnx(path)
    if path.is_dir() and is_shards_dir(path):
        from artscale.data.pack import describe_shards

        return describe_shards(path)
    from artscale.contracts.run_dir import describe

    return describe(path)


def _submit_pipeline(args: argparse.Namespace) -> None:
    import shlex

    from artscale.cluster.pipeline import submit_pipeline
    from artscale.cluster.slurm import Placement

    submit_pipeline(
        args.src,
        args.out,
        dry_run=args.dry_run,
        config=args.config,
        overrides=args.overrides,
        pack_args=_given(args.pack_flags, args),
        pack_cpus=args.pack_cpus,
        export_args=shlex.split(args.export_args),
        sample=args.sample,
        sample_args=shlex.split(args.sample_args),
        generate=args.generate,
        generate_args=shlex.split(args.generate_args),
        train={
            "nodes": args.nodes,
            "gpus_per_node": args.gpus_per_node,
            "cpu_processes": args.cpu_processes,
            "cpus_per_task": args.cpus_per_task,
            "cpus_per_gpu": args.cpus_per_gpu,
            "signal_seconds": args.signal_seconds,
        },
        arrays={
            "tasks": args.tasks,
            "max_running": args.max_running,
            "gpus_per_task": args.gpus_per_task,
            "cpus_per_task": args.array_cpus_per_task,
            "cpus_per_gpu": args.cpus_per_gpu,
        },
        placement=Placement(args.time_limit, args.partition, args.account, args.sbatch_args),
        array_time=args.array_time,
    )


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from artscale.demo import run_demo

        run_demo(args.out, steps=args.steps)
    elif args.command == "pack":
        from artscale.data.pack import pack

        opts = vars(args).copy()
        for k in ("command", "src", "out"):
            opts.pop(k)
        if "classes" in opts:
            opts["classes"] = [c for c in opts["classes"].split(",") if c]
        pack(args.src, args.out, **opts)
    elif args.command == "verify":
        from artscale.data.pack import verify

        problems = verify(args.shards)
        for line in problems:
            print(line, file=sys.stderr)
        if not problems:
            print(f"{args.shards}: every shard matches manifest.json")
        return 1 if problems else 0
    elif args.command == "train":
        from artscale.train.loop import main as train_main

        return train_main(args.args)
    elif args.command == "export" and args.export_format == "diffusers":
        from artscale.export.diffusers import export_diffusers

        if args.fp16 or args.size or args.shards:
            raise UserError("--fp16, --size and --shards are for --format onnx (diffusers users pick a dtype at load)")
        export_diffusers(args.source, args.out, weights=args.weights, grid_count=args.grid_count)
    elif args.command == "export":
        from artscale.export.article import export_onnx

        export_onnx(
            args.source, args.out, fp16=args.fp16, size=args.size or None, shards=args.shards, weights=args.weights
        )
    elif args.command == "generate":
        from artscale.infer.generate import generate

        num_shards, shard_index = _shard(args)
        opts = vars(args).copy()
        for k in ("command", "model", "in_dir", "out_dir", "num_shards", "shard_index"):
            opts.pop(k)
        opts["variation"] = {k: opts.pop(k) for k in VARIATION_KEYS if k in opts}
        generate(args.model, args.in_dir, args.out_dir, num_shards=num_shards, shard_index=shard_index, **opts)
    elif args.command == "sample":
        from artscale.infer.sample import sample_images

        num_shards, shard_index = _shard(args)
        opts = {
            k: v for k, v in vars(args).items() if k not in ("command", "model", "out_dir", "num_shards", "shard_index")
        }
        sample_images(args.model, args.out_dir, num_shards=num_shards, shard_index=shard_index, **opts)
    elif args.command == "submit" and args.what != "pipeline":
        import shlex

        from artscale.cluster.slurm import submit

        opts = vars(args).copy()
        for k in ("command", "what", "dry_run", "config", "overrides", "generate_args", "sample_args"):
            opts.pop(k, None)
        if args.what == "train":
            opts["train_args"] = (["--config", args.config] if args.config else []) + args.overrides
        else:  # --generate-args / --sample-args: more flags for each task's command
            opts["script_args"] = shlex.split(getattr(args, f"{args.what}_args"))
        submit(args.what, opts, dry_run=args.dry_run)
    elif args.command == "submit":
        _submit_pipeline(args)
    elif args.command == "eval":
        from artscale.metrics.fid import fid_kid

        opts = vars(args).copy()
        for k in ("command", "generated", "shards"):
            opts.pop(k)
        fid_kid(args.generated, args.shards, **opts)
    elif args.command == "info":
        print(_info(args.path))
    elif args.command == "configs":
        from artscale.train.presets import describe_presets, show_preset

        if args.what == "show":
            print(show_preset(args.name), end="")
        else:
            print(describe_presets())
            print("use one: --config NAME; edit a copy: artscale configs show NAME > my.yaml, then --config my.yaml")
    elif args.command == "doctor":
        from artscale.doctor import doctor

        return doctor(need=args.need, as_json=args.json)
    elif args.command == "report":
        from artscale.report.build import write_report

        write_report(args.paths, args.out)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # everything after `train` is train's own: --config FILE, key=value
        args = argparse.Namespace(command="train", args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    run_command(lambda: _dispatch(args))


if __name__ == "__main__":
    main()

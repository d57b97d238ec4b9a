"""Docs that cannot rot: links and anchors resolve, every documented command parses, the reference is fresh,
and every path a documented command reads was made by an earlier documented command or is the reader's own.

The pages are read in the order a reader meets them: README.md, then the docs/ pages in the order of the
README's map. A path a command reads (pack's SRC, train's `data`, export's SOURCE, ...) must be made by a
command earlier in that order (or lie under such a path), or name the reader's own files: an absolute
path, `~/...` or `$VAR/...`, which the text around it describes.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from artscale.cli import build_parser
from artscale.core.errors import UserError
from artscale.train.config import load_config, train_parser
from artscale.train.presets import preset_names

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SHELL_BLOCK = re.compile(r"^```(bash|sh|shell)\s*$")
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    """README.md, then docs/ in the order README's map (its "Documentation" section) links them, then any
    page the map misses."""
    readme = ROOT / "README.md"
    ordered = [readme]
    start = next(n for n, line in prose(readme) if line.startswith("## Documentation"))
    for target in (t for t, n in links(readme) if n > start):
        path = (ROOT / target.split("#")[0]).resolve()
        if path.suffix == ".md" and path.is_relative_to(DOCS) and path not in ordered and path.is_file():
            ordered.append(path)
    return ordered + sorted(p for p in DOCS.rglob("*.md") if p not in ordered)


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`", "", line)))
    return out


def links(path: Path) -> list[tuple[str, int]]:
    return [(m.group(1) or m.group(2), n) for n, line in prose(path) for m in LINK.finditer(line)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ removed, spaces -> -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    result = set()
    for _, line in prose_with_code_headings(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = found.get(base, 0)
            result.add(base if n == 0 else f"{base}-{n}")
            found[base] = n + 1
    return result


def prose_with_code_headings(path: Path) -> list[tuple[int, str]]:
    """Like prose(), but keeping inline code (a heading's `code` counts in its anchor)."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            out.append((n, line))
    return out


def test_every_relative_link_and_anchor_resolves():
    bad = []
    for page in pages():
        for target, n in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)}:{n}: {target}"
            if not dest.exists():
                bad.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert bad == []


def test_the_anchor_rule_is_githubs():
    assert slug("Resume and preemption (exit 75)") == "resume-and-preemption-exit-75"
    assert slug("`artscale submit train`: 8 x 8 GPUs") == "artscale-submit-train-8-x-8-gpus"
    assert slug("CUDA 12 (drivers R525-R575)") == "cuda-12-drivers-r525-r575"


def shell_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every ```bash/```sh block, continuation lines joined."""
    lines = path.read_text().splitlines()
    out, inside, pending, start = [], False, "", 0
    for n, line in enumerate(lines, 1):
        if not inside:
            inside = bool(SHELL_BLOCK.match(line.strip()))
            continue
        if FENCE.match(line.strip()):
            inside = False
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def commands(text: str) -> list[list[str]]:
    """The simple commands of one shell line: split at && || ; |, comments dropped, VAR=x prefixes dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words, out = list(lexer), [[]]
    for w in words:
        if w in ("&&", "||", ";", "|", "&"):
            out.append([])
        else:
            out[-1].append(w)
    result = []
    for cmd in out:
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        if cmd:
            result.append(cmd)
    return result


def artscale_args(cmd: list[str]) -> tuple[str, list[str]] | None:
    """('artscale', args) for `artscale ...` (any path to it), ('train', args) for the training module's
    entries (`accelerate launch ... launch/train.py`, `-m artscale.train`), else None."""
    for i, word in enumerate(cmd):  # `artscale ...`, `.venv/bin/artscale ...`, `srun ... artscale ...`
        if Path(word).name == "artscale" and not word.endswith("/"):
            return "artscale", cmd[i + 1 :]
    if "-m" in cmd and cmd[cmd.index("-m") + 1 : cmd.index("-m") + 2] == ["artscale.train"]:
        return "train", cmd[cmd.index("-m") + 2 :]
    for i, word in enumerate(cmd):
        if word.endswith("launch/train.py"):
            return "train", cmd[i + 1 :]
    return None


def parse(kind: str, args: list[str]) -> tuple[str, object]:
    """Parse as the real command would (no execution); returns (command, namespace or config)."""
    redirect = args.index(">") if ">" in args else len(args)
    args = args[:redirect]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if kind == "artscale" and args[:1] == ["train"]:
                kind, args = "train", args[1:]
            if kind == "train":
                ns = train_parser().parse_args(args)
                return "train", config_of(ns.config, ns.overrides)
            ns = build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"the parser refuses it (exit {e.code}): {err.getvalue().strip()}") from None
    if ns.command == "submit" and ns.what == "train":
        return "submit train", config_of(ns.config, ns.overrides)
    return ns.command, ns


def config_of(config: str | None, overrides: list[str]) -> object:
    """The resolved config: a preset by name, else the defaults (a YAML file of the reader's is not read)."""
    try:
        return load_config(config if config in preset_names() else None, overrides)
    except UserError as e:
        raise AssertionError(f"config: {e}") from None


def documented_commands() -> list[tuple[str, str, list[str], list[str]]]:
    """(where, kind, args, words) of every artscale or training command in a shell block, in reading order."""
    found = []
    for page in pages():
        for n, line in shell_blocks(page):
            for cmd in commands(line):
                hit = artscale_args(cmd)
                if hit:
                    found.append((f"{page.relative_to(ROOT)}:{n}", hit[0], hit[1], cmd))
    return found


def test_the_docs_show_commands():
    kinds = {kind for _, kind, _, _ in documented_commands()}
    assert kinds == {"artscale", "train"}
    assert len(documented_commands()) > 60


def test_every_documented_command_parses_with_the_real_parser():
    bad = []
    for where, kind, args, _ in documented_commands():
        try:
            parse(kind, args)
        except AssertionError as e:
            bad.append(f"{where}: {shlex.join(args)}: {e}")
    assert bad == []


def test_a_wrong_flag_or_key_is_caught():
    with pytest.raises(AssertionError, match="refuses"):
        parse("artscale", ["pack", "a", "b", "--no-such-flag"])
    with pytest.raises(AssertionError, match="unknown config key"):
        parse("artscale", ["train", "--config", "article", "learning_rate=1"])
    with pytest.raises(AssertionError, match="unknown config key"):
        parse("artscale", ["submit", "train", "--config", "diffusion", "batchsize=8"])
    with pytest.raises(AssertionError, match="choose one of"):
        parse("train", ["mixed_precision=fp8"])


def own(path: str) -> bool:
    """The reader's own files: an absolute path, ~/..., $VAR/..., or a URL."""
    return path.startswith(("/", "~", "$")) or "://" in path or path.startswith(("pipe:", "-"))


def reads_and_makes(command: str, parsed: object, words: list[str]) -> tuple[list[str], list[str]]:
    """The paths a parsed command reads and the ones it makes."""
    ns = parsed
    made = [words[words.index(">") + 1]] if ">" in words else []
    if command in ("train", "submit train"):
        data = ns.data  # type: ignore[attr-defined]
        reads = [] if "{" in data else [data]
        return reads, [*made, ns.run_dir]  # type: ignore[attr-defined]
    table = {
        "pack": (["src"], ["out"]),
        "verify": (["shards"], []),
        "info": (["path"], []),
        "export": (["source", "shards"], ["out"]),
        "generate": (["model", "in_dir"], ["out_dir"]),
        "sample": (["model"], ["out_dir"]),
        "eval": (["generated", "shards", "inception_weights"], ["out"]),
        "report": (["path"], ["out"]),
    }
    if command == "submit":
        ins, outs = (["model", "in_dir"], ["out_dir"])
    elif command == "demo":
        return [], [str(ns.out), *made]  # type: ignore[attr-defined]
    elif command in table:
        ins, outs = table[command]
    else:
        return [], made
    get = lambda names: [str(getattr(ns, k)) for k in names if getattr(ns, k, None) not in (None, "")]  # noqa: E731
    reads = get(ins)
    if command == "report" and not ns.out:  # type: ignore[attr-defined]
        outs = []
    return reads, [*made, *get(outs)]


def under(path: str, made: set[str]) -> bool:
    parts = Path(path.rstrip("/")).parts
    return any(Path(m.rstrip("/")).parts == parts[: len(Path(m.rstrip("/")).parts)] for m in made)


def test_every_path_a_command_reads_was_made_before_or_is_the_readers_own():
    made: set[str] = set()
    bad = []
    for where, kind, args, words in documented_commands():
        try:
            command, parsed = parse(kind, args)
        except AssertionError:  # a line the parser refuses fails the test above
            continue
        reads, makes = reads_and_makes(command, parsed, words)
        for path in reads:
            if path != "random" and not own(path) and not under(path, made):
                bad.append(f"{where}: {shlex.join(args)}: reads {path}, which no earlier command makes")
        made.update(m for m in makes if m)
    assert bad == []


def test_the_path_rule_catches_a_path_nothing_made():
    assert not under("shards/demo-32", {"artscale-demo", "shards/art"})
    assert under("artscale-demo/shards-32", {"artscale-demo"}) and under("runs/art/", {"runs/art"})


def test_the_reference_pages_are_fresh():
    checked = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_reference.py"), "--check"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_the_reference_names_every_command_flag_and_key():
    cli = (DOCS / "reference" / "cli.md").read_text()
    for flag in ("--val-fraction", "--provider", "--account", "--cpu-processes", "--sample-args", "--need"):
        assert f"`{flag}" in cli, flag
    without_help = [line for line in cli.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert without_help == [], "give these arguments a help= text"
    config = (DOCS / "reference" / "config.md").read_text()
    keys = load_config().to_dict()
    missing = [k for k in keys if f"| `{k}` |" not in config]
    assert missing == []
    undocumented = [line for line in config.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert undocumented == [], "document these keys in artscale/train/config.py (a trailing comment or #: lines above)"

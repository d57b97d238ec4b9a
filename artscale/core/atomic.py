"""The one way artscale writes a file: whole or not at all, and only where it was asked to.

A reader sees the old content or the new one, never half of it, even after a crash: the data goes
to a temporary file that is fsynced, then renamed over the target. On a shared filesystem the
folder being written may hold what someone else planted, so the temporary file is created
exclusively (O_CREAT|O_EXCL|O_NOFOLLOW: a symlink at its name is never followed), under a short
name (a 255-byte target name still works), and the folders from `root` (the folder the user named)
down to the target are opened one by one without following links: a folder inside root that is a
symlink is refused with UnsafePath (writing through it would land outside root), and the rename
happens inside the folder so opened, never through a path that could be swapped for a link.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO

from artscale.core.errors import UserError

TMP_SUFFIX = ".artscale-tmp"  # every temporary file artscale makes ends so (".<16 hex>.artscale-tmp")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(UserError):
    """A write would go through a symlink (or a `..`) inside the folder the user named."""


def tmp_name(name: str) -> str:
    """The temporary name of a target named `name`: short, and the same on every run, so that a rerun
    removes what a killed one left (a planted file there is removed, never written through)."""
    return "." + hashlib.sha256(os.fsencode(name)).hexdigest()[:16] + TMP_SUFFIX


def _parts(path: Path, root: Path) -> tuple[str, ...]:
    """path's components below root; UnsafePath when path is not inside root or climbs with `..`."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise UnsafePath(f"{path} is not inside {root}: artscale writes only inside the folder it was given") from None
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{path} is not inside {root}: artscale writes only inside the folder it was given")
    return parts


def _refuse_link(folder: Path, root: Path) -> UnsafePath:
    return UnsafePath(
        f"{folder} is a symbolic link inside {root}: artscale does not write through links (they may point "
        "anywhere); remove it, or give its target as the output folder"
    )


def open_folder(root: str | Path, rel: tuple[str, ...] | str | Path = (), *, create: bool = True) -> int:
    """An fd of root/rel, each folder below root opened without following a link (made when missing
    if `create`). root itself is the user's and may be a link; it is made when missing.

    UnsafePath when a folder below root is a symlink; OSError (NotADirectoryError, FileNotFoundError)
    as usual otherwise. The caller closes the fd."""
    root = Path(root)
    parts = Path(rel).parts if isinstance(rel, str | Path) else rel
    if any(p in ("", ".", "..") or "/" in p for p in parts):
        raise UnsafePath(f"{root / Path(*parts)}: not a folder inside {root}")
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            if create:
                try:
                    os.mkdir(part, dir_fd=fd)  # never follows: an existing link makes it fail, then the open refuses
                except FileExistsError:
                    pass
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                    raise _refuse_link(root.joinpath(*parts[: i + 1]), root) from None
                raise
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_tmp(name: str, dir_fd: int) -> tuple[str, int]:
    """(temporary name, fd) created exclusively in dir_fd: the target's own short name, whatever was
    there removed first (a killed run's leftover, or a planted link: unlinked, not followed); a random
    one when that entry cannot be removed (a folder, another user's file)."""
    tmp = tmp_name(name)
    try:
        return tmp, os.open(tmp, _TMP_FLAGS, 0o666, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        os.unlink(tmp, dir_fd=dir_fd)
        return tmp, os.open(tmp, _TMP_FLAGS, 0o666, dir_fd=dir_fd)
    except OSError:
        pass
    for _ in range(100):
        tmp = "." + secrets.token_hex(8) + TMP_SUFFIX
        try:
            return tmp, os.open(tmp, _TMP_FLAGS, 0o666, dir_fd=dir_fd)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", name)


def write_atomic(
    path: str | Path, data: bytes | str, *, root: str | Path | None = None, sync_dir: bool = False
) -> None:
    """Write `data` (str as UTF-8) to a temporary file beside `path`, fsync it, rename it over `path`.

    `root` is the folder the user named (default: path's folder); the folders between root and path
    are made when missing and must not be symlinks (UnsafePath). A target that is a symlink is
    replaced by the file, never written through. A failed write removes the temporary file and
    re-raises the OSError. `sync_dir` fsyncs the folder too, so the rename itself survives a power
    loss, for files whose loss would undo finished work."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    parts = _parts(path, root)
    payload = data.encode() if isinstance(data, str) else data
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"write_atomic needs bytes or str, not {type(data).__name__}")
    dir_fd = open_folder(root, parts[:-1])
    try:
        tmp, fd = _create_tmp(parts[-1], dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        if sync_dir:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: str | Path, data: Any, *, sort_keys: bool = True, root: str | Path | None = None) -> None:
    """`data` as indented JSON plus a newline, through write_atomic."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", root=root)


def refuse_linked_folders(root: str | Path, rels: list[str]) -> None:
    """UnsafePath, before any work, when a folder that the files `rels` (relative to root, `/`-separated)
    go to is a symlink inside root.

    Refused rather than skipped: the run could not finish what it was asked, a skip would hide that
    behind exit 0, and the fix is one `rm` of the link (or naming its target as the output folder)."""
    root, seen = Path(root), set()
    for rel in rels:
        folder = rel.rpartition("/")[0]
        while folder and folder not in seen:
            seen.add(folder)
            if (root / folder).is_symlink():
                raise _refuse_link(root / folder, root)
            folder = folder.rpartition("/")[0]


def regular_files(root: str | Path, rels: list[str]) -> list[bool]:
    """For each `/`-separated rel, whether root/rel is a regular file reached through no symlink
    (neither the file nor a folder below root): what counts as an output that is done, and what a
    report may read. A link planted in an output folder would otherwise pass an outside file off
    as finished work. Each folder is looked at once (a rerun's skip check runs over every output)."""
    base = os.fspath(root)
    folders: dict[str, bool] = {"": True}

    def real_folder(rel: str) -> bool:
        if rel not in folders:
            parent, _, name = rel.rpartition("/")
            folders[rel] = real_folder(parent) and name not in ("", ".", "..") and _lstat_is(base, rel, stat.S_ISDIR)
        return folders[rel]

    found = []
    for rel in rels:
        folder, _, name = rel.rpartition("/")
        ok = name not in ("", ".", "..") and not rel.startswith("/") and real_folder(folder)
        found.append(ok and _lstat_is(base, rel, stat.S_ISREG))
    return found


def _lstat_is(base: str, rel: str, kind: Any) -> bool:
    try:
        return kind(os.lstat(os.path.join(base, rel)).st_mode)
    except OSError:
        return False


def regular_file(path: str | Path, root: str | Path) -> bool:
    """regular_files for one path inside root (False when it is not inside)."""
    try:
        parts = _parts(Path(path), Path(root))
    except UnsafePath:
        return False
    return regular_files(root, ["/".join(parts)])[0]


def fresh_dir(path: str | Path, root: str | Path | None = None) -> Path:
    """An empty folder at `path`, made by this call: whatever was there (a killed run's leftover, a
    file, a planted symlink) is removed first without following it. The folders between root (default:
    path's folder) and path must not be links (UnsafePath). For folders that are filled by name
    afterwards (a checkpoint's step-N.tmp, final.tmp, an export's OUT.tmp-PID)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    parts = _parts(path, root)
    fd = open_folder(root, parts[:-1])
    try:
        name = parts[-1]
        try:
            st = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # refuses a link at the top; links inside are removed, not followed
        elif st is not None:
            os.unlink(name, dir_fd=fd)
        os.mkdir(name, dir_fd=fd)  # exclusive: fails if something was planted again meanwhile
    finally:
        os.close(fd)
    return path


def remove_tree(path: str | Path) -> None:
    """Remove path whatever it is, never following a link: a link is unlinked, a folder removed with
    the links in it (not their targets). Missing is fine; other errors are ignored as before."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def create_fresh(path: str | Path) -> BinaryIO:
    """A new empty file at path, open for writing: for a file written piece by piece and renamed when
    complete (a shard's NAME.partial). Whatever was at path (a killed run's leftover, a planted link)
    is removed first, not followed, and the file is created exclusively."""
    path = Path(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, _TMP_FLAGS, 0o666), "wb")


def append_text(path: str | Path, text: str, *, sync: bool = True) -> None:
    """Append `text` to path (made when missing), fsynced when `sync` (a journal's line), never through
    a symlink at path: UnsafePath then."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link: artscale does not write through links; remove it") from None
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if sync:
            os.fsync(f.fileno())

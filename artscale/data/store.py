"""Where shards live: a local folder, or a URL (s3://, gs://, https://, any fsspec protocol).

The one module that talks to object storage, always through fsspec (s3fs for S3, gcsfs for GCS,
aiohttp for HTTP), never through HTTP code of its own. Credentials stay where each ecosystem keeps
them (AWS_* variables, ~/.aws and AWS_ENDPOINT_URL; gcloud's ADC; ~/.netrc for HTTP). A URL that
carries a login or a query is refused, so no URL that artscale prints or saves (config.json, logs,
metrics, W&B, the report) holds a secret; a missing or refused credential is one line naming the
URL and what to set. A transient error (a reset connection, a 503, a short read) is retried with
backoff, and a file is always read again from its start, whole, before any of it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

from artscale.core.atomic import append_text, write_atomic
from artscale.core.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
BUCKETS = ("s3", "s3a", "gs", "gcs")  # the first path component is a bucket, which artscale never creates
READ_ONLY = ("http", "https")  # no listing, no writes: serve a packed folder as it is
CHUNK = 16 << 20  # bytes per read of a remote file
SPOOL = 64 << 20  # a fetched file stays in memory up to this size, then spills to a temporary file
ATTEMPTS = 5
BACKOFF_S = 0.5  # then 1, 2, 4 s
_S3 = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE for ~/.aws/credentials), "
    "and AWS_ENDPOINT_URL for an S3-compatible store"
)
_GS = "set GOOGLE_APPLICATION_CREDENTIALS to a key file, or run `gcloud auth application-default login`"
_HTTP = "put the host's login in ~/.netrc (or in the file that NETRC names)"
HINTS = {"s3": _S3, "s3a": _S3, "gs": _GS, "gcs": _GS, "http": _HTTP, "https": _HTTP}
_NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "DefaultCredentialsError",
}
_AUTH = _NO_CREDENTIALS | {"RefreshError"}
_NETWORK = {"ClientError", "BotoCoreError", "TransportError"}  # aiohttp's, botocore's, google-auth's bases


class ShortRead(OSError):
    """A file came back shorter or longer than the manifest says: read it again."""


def is_url(where: str | Path) -> bool:
    return isinstance(where, str) and bool(_SCHEME.match(where))


def redact(url: str) -> str:
    """`url` without a login or a query, for messages about a URL that check_url refused."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", url)
    return re.sub(r"[?#].*$", "?***", url)


def hint(url: str) -> str:
    return HINTS.get(urlsplit(url).scheme.lower(), "see the credentials of this fsspec protocol")


def check_url(url: str) -> str:
    """`url` if artscale can use it; else a UserError naming what to do, never repeating a secret."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        login = parts.username is not None or parts.password is not None
    except ValueError as e:
        raise UserError(f"{shown}: not a valid URL ({e})") from None
    if login:
        raise UserError(
            f"{shown}: a login inside a URL would be saved in config.json and logs; {hint(url)}, and drop it from the URL"
        )
    if parts.query or parts.fragment:
        raise UserError(f"{shown}: a shards URL takes no query or fragment (?...); for credentials {hint(url)}")
    import fsspec

    try:
        fsspec.get_filesystem_class(parts.scheme.lower())
    except ImportError as e:
        raise UserError(f"{shown}: {e} (pip install it beside artscale)") from None
    except ValueError:
        raise UserError(
            f"{shown}: unknown URL scheme {parts.scheme}://; use s3://, gs://, https:// (or another fsspec protocol)"
        ) from None
    return url


def join(root: str | Path, name: str) -> str | Path:
    """`name` inside the folder `root`: a URL for a URL, a Path for a path."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else Path(root) / name


def _kind(e: BaseException) -> str:
    """auth (say which credential to set), missing, transient (read again), or fatal."""
    cause = e.__cause__
    if isinstance(e, FileNotFoundError) and cause is not None and _kind(cause) != "fatal":
        return _kind(cause)  # fsspec's HTTP says FileNotFoundError for any failed HEAD and GET: a 401, a 503
    names = {c.__name__ for c in type(e).__mro__}
    response = getattr(e, "response", None)  # botocore's ClientError: any S3 error answer, 404s included
    meta = response.get("ResponseMetadata", {}) if isinstance(response, dict) else {}
    status = getattr(e, "status", None) or meta.get("HTTPStatusCode")
    if names & _AUTH or isinstance(e, PermissionError) or status in (401, 403):
        return "auth"
    if isinstance(e, FileNotFoundError) or status == 404:
        return "missing"
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return "fatal"
    if isinstance(e, (OSError, TimeoutError)) or names & _NETWORK:
        return "transient"
    return "fatal"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def retry(fn: Callable[[], T], url: str, attempts: int = 0, backoff: float | None = None) -> T:
    """`fn()`, again after a transient error (backoff, doubling); a credential problem is a UserError.
    The defaults are ATTEMPTS and BACKOFF_S, read at the call."""
    attempts, backoff = attempts or ATTEMPTS, backoff if backoff is not None else BACKOFF_S
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            kind = _kind(e)
            if kind == "auth":
                why = e.__cause__ if isinstance(e, FileNotFoundError) and e.__cause__ else e
                what = (
                    "no credentials found" if {c.__name__ for c in type(why).__mro__} & _NO_CREDENTIALS else "refused"
                )
                raise UserError(f"{url}: {what} ({_first_line(why)}); {hint(url)}") from None
            if kind != "transient" or attempt == attempts - 1:
                raise
            delay = backoff * 2**attempt
            log.warning(
                "%s: %s; reading it again in %.1f s (try %d of %d)", url, _first_line(e), delay, attempt + 2, attempts
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, its path) of a checked URL. HTTP trusts the environment: ~/.netrc, proxies."""
    import fsspec

    options = {"client_kwargs": {"trust_env": True}} if urlsplit(url).scheme.lower() in READ_ONLY else {}
    return fsspec.core.url_to_fs(check_url(url), **options)


def _call(url: str, fn: Callable[[], T]) -> T:
    """A metadata call (a listing, a small read or write): retried, and a store that keeps failing is one line."""
    try:
        return retry(fn, url)
    except UserError:
        raise
    except Exception as e:  # FileNotFoundError passes on as it is, unless fsspec's HTTP hides a 503 in it
        if _kind(e) != "transient":
            raise
        raise UserError(
            f"{url}: {_first_line(e)} (after {ATTEMPTS} tries); check the network and the endpoint "
            "(AWS_ENDPOINT_URL for an S3-compatible store), then run the same command again"
        ) from None


def exists(where: str | Path) -> bool:
    """Is there a file at this path or URL?"""
    if not is_url(where):
        return Path(where).is_file()
    fs, path = _fs(where)
    fs.invalidate_cache(path)  # another process may have written or removed it since this one looked
    try:
        return _call(where, lambda: fs.info(path)).get("type") != "directory"
    except FileNotFoundError:
        return False


def read_bytes(where: str | Path) -> bytes:
    """A whole (small) file at this path or URL; FileNotFoundError where there is none."""
    if not is_url(where):
        return Path(where).read_bytes()
    fs, path = _fs(where)
    return _call(where, lambda: fs.cat_file(path))


def _read_options(fs: Any) -> dict[str, Any]:
    """fsspec's HTTP reads a whole file as one stream with block_size 0 (a server may not do ranges);
    object stores read a range per CHUNK, with nothing cached twice."""
    if "http" in fs.protocol or "https" in fs.protocol:
        return {"block_size": 0}
    return {"block_size": CHUNK, "cache_type": "none"}


def fetch(url: str, size: int | None = None, *, attempts: int = 0, backoff: float | None = None) -> IO[bytes]:
    """The whole file at `url`, in memory (on disk past SPOOL), positioned at 0. A transient error, or a
    length other than `size`, reads it again from the start; an OSError naming the URL when it keeps failing."""
    fs, path = _fs(url)
    spool = tempfile.SpooledTemporaryFile(SPOOL)
    attempts, backoff = attempts or ATTEMPTS, backoff if backoff is not None else BACKOFF_S

    def attempt() -> IO[bytes]:
        fs.invalidate_cache(path)  # the size fsspec may know from an older listing
        spool.seek(0)
        spool.truncate()
        with fs.open(path, "rb", **_read_options(fs)) as f:
            shutil.copyfileobj(f, spool, CHUNK)
        if size is not None and spool.tell() != size:
            raise ShortRead(f"read {spool.tell()} bytes, the manifest says {size}")
        spool.seek(0)
        return spool

    try:
        return retry(attempt, url, attempts, backoff)
    except UserError:
        spool.close()
        raise
    except Exception as e:
        spool.close()
        if _kind(e) == "missing":
            raise FileNotFoundError(f"{url}: not found") from None
        tries = f" after {attempts} tries" if _kind(e) == "transient" else ""
        raise OSError(f"{url}: {type(e).__name__}: {_first_line(e)}{tries}") from e


def sha256_stream(f: IO[bytes]) -> str:
    """The sha256 of what is left to read in the open binary file `f`."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


class NotAFile(OSError):
    """A name in a local shards folder that is a symlink or not a regular file: never read through."""


class LocalDir:
    """A shards folder on a filesystem, written only through artscale.core.atomic: a file under a
    temporary name renamed into place, an append that never follows a symlink. A symlink inside it is
    never read as a shard (it may lead anywhere), nor counted as one by `sizes`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.label = str(self.path)

    def prepare(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"OUT {self.path} is a file; pick a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create OUT {self.path}: {e.strerror or e}") from None

    def staging(self) -> Path:
        """Where a shard is written before it is published: beside its final name."""
        return self.path

    def names(self) -> list[str]:
        return [p.name for p in self.path.iterdir()]

    def sizes(self) -> dict[str, int] | None:
        """name -> bytes of each regular file in the folder (a symlink is not one: lstat, never followed)."""
        sizes = {}
        for p in self.path.iterdir():
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                sizes[p.name] = st.st_size
        return sizes

    def read_text(self, name: str) -> str | None:
        """The file `name`, or None where there is none or it is not a regular file (a symlink)."""
        try:
            with self.open(name) as f:
                return f.read().decode()
        except (FileNotFoundError, NotAFile):
            return None

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.path / name, text, root=self.path, sync_dir=True)

    def append_line(self, name: str, line: str) -> None:
        append_text(self.path / name, line)

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def publish(self, partial: Path, name: str) -> None:
        partial.replace(self.path / name)  # rename: a link planted at the final name is replaced, not followed

    def open(self, name: str, size: int | None = None) -> IO[bytes]:
        """The file `name`, opened without following a symlink (NotAFile: a link may lead outside the
        folder) and without blocking on a FIFO (NotAFile: not a regular file)."""
        path = self.path / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise
        except OSError:
            if path.is_symlink():
                raise NotAFile(
                    f"a symlink; shards are read only as files inside {self.path} (copy the shard there)"
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotAFile("not a regular file")
        return os.fdopen(fd, "rb")


class RemoteDir:
    """A shards folder at a URL. A finished local file is published with the store's atomic put (a
    single PUT, or a multipart upload that shows nothing until it completes). An object store has no
    append: a journal line rewrites the journal whole, also atomically."""

    def __init__(self, url: str) -> None:
        self.url = check_url(url).rstrip("/")
        self.label = self.url
        self.protocol = urlsplit(self.url).scheme.lower()
        self.fs, self.root = _fs(self.url)
        self._texts: dict[str, str] = {}  # what this process last wrote to a file it appends to
        self._staging: Path | None = None

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def prepare(self) -> None:
        if self.protocol in READ_ONLY:
            raise UserError(f"{self.url}: HTTP is read-only; pack to s3://, gs:// or a folder, and serve that")
        if self.protocol in BUCKETS:
            bucket = self.root.split("/")[0]
            self.fs.invalidate_cache()
            try:  # not fs.exists: s3fs's answers False where the credentials are missing
                _call(self.url, lambda: self.fs.info(bucket))
            except FileNotFoundError:
                raise UserError(
                    f"{self.url}: bucket {bucket} does not exist (or these credentials cannot see it); create it first"
                ) from None
        else:
            _call(self.url, lambda: self.fs.makedirs(self.root, exist_ok=True))

    def staging(self) -> Path:
        """A local temporary folder where a shard is written before it is uploaded (removed by `close`)."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="artscale-pack-"))
        return self._staging

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _entries(self) -> list[dict]:
        self.fs.invalidate_cache(self.root)  # another process (a killed pack) may have written since
        try:
            return _call(self.url, lambda: self.fs.ls(self.root, detail=True))
        except FileNotFoundError:
            return []

    def names(self) -> list[str]:
        """The names in the folder; none over HTTP, which cannot list."""
        if self.protocol in READ_ONLY:
            return []
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._entries()]

    def sizes(self) -> dict[str, int] | None:
        """name -> bytes of each file in the folder, in one listing; None over HTTP, which cannot list."""
        if self.protocol in READ_ONLY:
            return None
        return {e["name"].rsplit("/", 1)[-1]: int(e["size"]) for e in self._entries() if e["type"] == "file"}

    def read_text(self, name: str) -> str | None:
        try:
            return _call(self.url, lambda: self.fs.cat_file(self._path(name))).decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        _call(self.url, lambda: self.fs.pipe_file(self._path(name), text.encode()))
        self._texts[name] = text

    def append_line(self, name: str, line: str) -> None:
        if name not in self._texts:
            self._texts[name] = self.read_text(name) or ""
        self.write_text(name, self._texts[name] + line)

    def remove(self, name: str) -> None:
        self._texts.pop(name, None)
        try:
            _call(self.url, lambda: self.fs.rm_file(self._path(name)))
        except FileNotFoundError:
            pass

    def publish(self, partial: Path, name: str) -> None:
        _call(self.url, lambda: self.fs.put_file(str(partial), self._path(name)))
        partial.unlink()

    def open(self, name: str, size: int | None = None) -> IO[bytes]:
        return fetch(join(self.url, name), size)


Folder = LocalDir | RemoteDir


def open_dir(where: str | Path) -> Folder:
    return RemoteDir(where) if is_url(where) else LocalDir(where)


def listing(root: str | Path) -> dict[str, int] | None:
    """name -> bytes of the files in a shards folder; None where it cannot be listed (HTTP)."""
    return open_dir(root).sizes()

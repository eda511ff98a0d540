"""Where shard directories live: a local path or any fsspec URL (``s3://``, ``gs://``, ``hf://``, ``file://``).

A :class:`Store` is one directory; every read and write of shard directories goes through one, so the same
code serves a local folder and an object-store prefix:

- *Writes are all-or-nothing.* Locally a file is written under a temporary name, fsynced and renamed. On an
  object store a complete local file is uploaded to its final key (one PUT, or a multipart upload that
  becomes visible only when completed), so a partial upload never appears under its final name. Callers
  write the manifest after the files it lists.
- *Reads stream.* A remote Parquet file is opened as a seekable file and read a row group at a time (range
  requests); nothing downloads a whole directory. With a cache directory (:func:`configure`) each remote file
  is instead downloaded once, checked against the manifest's sha256 and read locally from then on; the
  cache is content-addressed (``CACHE/ab/abcd….parquet``), so a changed file can never be served stale.
- *Transient errors are retried.* Connection resets, timeouts, throttling and server errors are retried with
  exponential backoff (``backoff * 2**attempt`` seconds); after the last attempt the error names the file.

Credentials and endpoints come from fsspec's usual places (``AWS_*`` variables, ``~/.aws``, ``HF_TOKEN``,
``FSSPEC_S3_ENDPOINT_URL``, …) or from ``storage_options`` (the CLI's ``--storage-options JSON``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import posixpath
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# what Arrow's Parquet reader says (as a plain OSError) of bytes that arrived but are wrong: not worth a retry
CORRUPT_DATA = re.compile(r"CRC checksum verification failed|deserialize thrift|decompression failed|[Cc]orrupt")
TRANSIENT_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "httpx", "google")
READ_BLOCK_BYTES = 8 << 20


class StorageError(OSError):
    """A storage operation that still failed after its retries; the message names the file."""


class IntegrityError(StorageError):
    """A file whose bytes differ from the digest the caller expected (changed or corrupted since it
    was recorded); the message names the file. The storage layer checks bytes, never their format."""


class OutputInUse(StorageError):
    """Another process is writing the same output (directory, or capture worker's share of it)."""


LOCK_FILE = re.compile(r"^\.amid-pipeline[\w.-]*\.lock$")  # never data: ignored wherever a directory is listed


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, role: str = "") -> Iterator[None]:
    """Hold ``directory/.amid-pipeline{role}.lock`` (an ``flock``) while the block runs: a second writer of
    the same local output (and role, e.g. a capture worker index) is refused at once, naming the first.
    The kernel releases the lock when its process ends, kill -9 included. Remote outputs are not locked."""
    if is_url(str(directory)):
        yield
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f".amid-pipeline{role}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputInUse(f"{directory} is being written by {holder}; wait for it to end or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({shlex.join(sys.argv)[:200]})".encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclasses.dataclass
class StorageSettings:
    """Process-wide storage settings (set once by the CLI or a training script with :func:`configure`)."""

    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache_dir: str | None = None
    attempts: int = 5
    backoff: float = 0.5


SETTINGS = StorageSettings()


def configure(*, storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
              attempts: int = 5, backoff: float = 0.5) -> None:
    """Set the options passed to every fsspec filesystem, the local cache of remote files (``None``: none)
    and the retries; every call replaces all of them."""
    SETTINGS.storage_options = dict(storage_options or {})
    SETTINGS.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
    SETTINGS.attempts = max(1, int(attempts))
    SETTINGS.backoff = float(backoff)
    open_store.cache_clear()


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network and server-side failures, not missing files or refused permissions."""
    if isinstance(exc, PERMANENT_ERRORS) or type(exc).__module__.startswith("pyarrow") or CORRUPT_DATA.search(str(exc)):
        return False  # pyarrow's own errors mean bad data; a network error inside a read surfaces as itself
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    return type(exc).__module__.split(".")[0] in TRANSIENT_MODULES


def retry(call: Callable[[], T], what: str) -> T:
    """``call()``, retried on transient errors with exponential backoff; then a :class:`StorageError` naming ``what``."""
    for attempt in range(SETTINGS.attempts):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt + 1 == SETTINGS.attempts:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc} (failed {SETTINGS.attempts} times)") from exc
            time.sleep(SETTINGS.backoff * 2**attempt)
    raise AssertionError("unreachable")


def is_url(location: str) -> bool:
    return "://" in str(location)


class Store:
    """One directory at ``url`` (a local path or an fsspec URL); names inside it are ``/``-separated.

    A name may also be a path relative to the directory that leaves it (``../run-b/data/x.parquet``) or a
    full URL: that is how a combined manifest points at files of other directories without copying them.
    """

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url).rstrip("/") or "/"
        try:
            self._fs, root = fsspec.core.url_to_fs(self.url, **SETTINGS.storage_options) if is_url(self.url) else (
                LocalFileSystem(), os.path.abspath(os.path.expanduser(self.url)))
        except ImportError as exc:  # e.g. s3:// without s3fs
            raise StorageError(f"{self.url}: {exc} (pip install 'amid-pipeline[s3]' or '[gcs]')") from exc
        except ValueError as exc:  # unknown protocol or bad option
            raise StorageError(f"{self.url}: {exc}") from exc
        self._pid = os.getpid()
        self.local = isinstance(self._fs, LocalFileSystem)
        self.root = root.rstrip("/") or "/"

    @property
    def fs(self):
        """The fsspec filesystem; made anew in a forked process (DataLoader workers), as async clients need."""
        if self._pid != os.getpid():
            self._fs, self._pid = fsspec.core.url_to_fs(self.url, **SETTINGS.storage_options)[0], os.getpid()
        return self._fs

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # --- names --------------------------------------------------------------------------------------
    def locate(self, name: str) -> tuple[Any, str]:
        """(filesystem, path) of ``name``."""
        if is_url(name):
            return fsspec.core.url_to_fs(name, **SETTINGS.storage_options)
        return self.fs, posixpath.normpath(posixpath.join(self.root, name))

    def where(self, name: str) -> str:
        """``name`` as a user would type it (for messages)."""
        if is_url(name):
            return name
        if not name:
            return self.url
        if is_url(self.url):
            protocol, rest = self.url.split("://", 1)
            return f"{protocol}://{posixpath.normpath(posixpath.join(rest, name))}"
        return posixpath.normpath(posixpath.join(self.url, name))

    def name_of(self, store: Store, name: str) -> str:
        """How ``name`` inside ``store`` is named from this directory: relative when on the same filesystem."""
        fs, path = store.locate(name)
        if type(fs) is type(self.fs) and fs.protocol == self.fs.protocol and not is_url(name):
            return posixpath.relpath(path, self.root)
        return fs.unstrip_protocol(path)

    # --- reading ------------------------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        fs, path = self.locate(name) if name else (self.fs, self.root)
        return retry(lambda: fresh(fs, path).exists(path), self.where(name))

    def is_dir(self) -> bool:
        return retry(lambda: fresh(self.fs, self.root).isdir(self.root), self.url)

    def is_empty(self) -> bool:
        """True when the directory is missing or holds nothing (but lock files)."""
        if not self.is_dir():
            return not self.exists()
        entries = retry(lambda: fresh(self.fs, self.root).ls(self.root, detail=False), self.url)
        return all(LOCK_FILE.match(posixpath.basename(entry.rstrip("/"))) for entry in entries)

    def size(self, name: str) -> int:
        fs, path = self.locate(name)
        return int(retry(lambda: fresh(fs, path).size(path), self.where(name)))

    def list(self, folder: str = "") -> list[str]:
        """Names of the files directly inside ``folder`` (relative to this directory), sorted."""
        base = posixpath.join(self.root, folder) if folder else self.root
        if not retry(lambda: fresh(self.fs, base).isdir(base), self.where(folder)):
            return []
        found = retry(lambda: fresh(self.fs, base).ls(base, detail=True), self.where(folder))
        names = [posixpath.relpath(entry["name"].rstrip("/"), self.root) for entry in found if entry["type"] == "file"]
        return sorted(name for name in names if not LOCK_FILE.match(posixpath.basename(name)))

    def read_bytes(self, name: str) -> bytes:
        fs, path = self.locate(name)
        return retry(lambda: fs.cat_file(path), self.where(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def sha256(self, name: str) -> str:
        """Hex sha256 of a file's bytes, streamed."""

        def digest() -> str:
            fs, path = self.locate(name)
            with fs.open(path, "rb", block_size=READ_BLOCK_BYTES) as f:
                return sha256_of(f)

        return retry(digest, self.where(name))

    def parquet(self, name: str, sha256: str | None = None, size: int | None = None) -> pq.ParquetFile:
        """Open a Parquet file for reading: memory-mapped if local, else from the cache (a copy verified against
        ``sha256``) or streamed. A file of another ``size`` than expected raises :class:`IntegrityError`
        before it is read (a cached copy is checked by its digest instead). Every page that carries a CRC32 is
        checked against it as it is read (a mismatch raises ``OSError``)."""
        fs, path = self.locate(name)
        cached = not isinstance(fs, LocalFileSystem) and SETTINGS.cache_dir and sha256
        if size is not None and not cached and (found := retry(lambda: fs.size(path), self.where(name))) != size:
            raise IntegrityError(f"{self.where(name)}: {found} bytes, {size} expected (truncated or replaced since it "
                                 f"was recorded); run `amid-pipeline verify`")
        if isinstance(fs, LocalFileSystem):
            return pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
        if cached:
            return pq.ParquetFile(self.cached_copy(name, sha256), memory_map=True, page_checksum_verification=True)
        return retry(lambda: pq.ParquetFile(fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead"),
                                            page_checksum_verification=True), self.where(name))

    def cached_copy(self, name: str, sha256: str) -> str:
        """Local path of a verified copy of remote file ``name`` in the cache (downloaded on first use)."""
        target = os.path.join(SETTINGS.cache_dir, sha256[:2], f"{sha256}{posixpath.splitext(name)[1]}")
        if os.path.exists(target):
            return target
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        fs, path = self.locate(name)

        def download() -> str:
            with fs.open(path, "rb", block_size=READ_BLOCK_BYTES) as src, open(tmp, "wb") as dst:
                return sha256_of(src, copy_to=dst)

        try:
            digest = retry(download, self.where(name))
            if digest != sha256:
                raise IntegrityError(f"{self.where(name)}: sha256 {digest[:16]}… differs from the expected "
                                     f"{sha256[:16]}… (changed or corrupted since it was recorded)")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    # --- writing ------------------------------------------------------------------------------------
    def makedirs(self, folder: str = "") -> None:
        if self.local:
            os.makedirs(posixpath.join(self.root, folder), exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        """Replace ``name`` with ``text`` atomically (readers see the old or the new file, never half)."""
        staging = self.staging_path(name)
        with open(staging, "w", encoding="utf-8") as f:
            f.write(text)
        self.commit(staging, name)

    def staging_path(self, name: str) -> str:
        """A local path to prepare ``name`` in before :meth:`commit`: next to it locally, else a temp folder."""
        if self.local:
            folder, base = posixpath.split(posixpath.join(self.root, name))
            os.makedirs(folder, exist_ok=True)
            return posixpath.join(folder, f".{base}.tmp")
        return os.path.join(_upload_dir(), f"{os.getpid()}-{hashlib.sha1(self.where(name).encode()).hexdigest()}")

    def commit(self, staging: str, name: str) -> None:
        """Make the complete local file ``staging`` appear as ``name`` (fsync + rename, or upload), then drop it."""
        fs, path = self.locate(name)
        if isinstance(fs, LocalFileSystem):
            with open(staging, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(staging, path)
            fsync_dir(posixpath.dirname(path))
            return
        try:
            retry(lambda: fs.put_file(staging, path), f"uploading {self.where(name)}")
        finally:
            os.unlink(staging)

    def remove(self, name: str) -> None:
        fs, path = self.locate(name)
        if retry(lambda: fs.exists(path), self.where(name)):
            retry(lambda: fs.rm(path, recursive=True), self.where(name))

    def clear(self) -> None:
        """Delete everything in this directory (the directory itself stays)."""
        if not self.is_dir():
            return
        for entry in retry(lambda: self.fs.ls(self.root, detail=False), self.url):
            retry(lambda: self.fs.rm(entry, recursive=True), self.fs.unstrip_protocol(entry))


def fresh(fs, path: str):
    """``fs`` with its cached listings of ``path`` dropped: another process may have written there since."""
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache(path)
    return fs


@functools.lru_cache(maxsize=256)
def open_store(location: str | os.PathLike) -> Store:
    """The :class:`Store` for a location (one per location and process)."""
    return Store(location)


@functools.lru_cache(maxsize=1)
def _upload_dir() -> str:
    return tempfile.mkdtemp(prefix="amid-upload-")


def sha256_of(f, copy_to=None, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of the rest of binary file ``f``, read in chunks (also written to ``copy_to`` if given)."""
    hasher = hashlib.sha256()
    while chunk := f.read(chunk_bytes):
        hasher.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return hasher.hexdigest()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Replace the local file ``path`` with ``payload`` as JSON (temporary file, fsync, rename)."""
    path = os.fspath(path)
    Store(os.path.dirname(path) or ".").write_text(os.path.basename(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")

"""Local paths and fsspec URLs, with the write guarantees prep relies on.

Two promises the rest of the pipeline builds on:

* **Atomic objects.**  A key either holds its complete new content or its old
  one.  Locally that is "write a temp file, then ``os.replace``"; on object
  storage a single PUT is already atomic.
* **Bounded, named failures.**  Remote writes are retried a configured number
  of times with exponential backoff, then fail with :class:`StorageError`
  naming the object URL.  botocore's and s3fs's own retry loops are turned
  off for writes so that the bound is ours and a dead store fails fast.

``S3_ENDPOINT_URL`` points s3fs at non-AWS stores (MinIO, Ceph, moto); the
MosaicML reader honours the same variable, so one setting serves both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import IO, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

from data_prep.config import RetryPolicy

T = TypeVar("T")


class StorageError(RuntimeError):
    """A read or write that failed for good; the message names the object."""

    def __init__(self, message: str):
        super().__init__(message)


def is_remote(url: str) -> bool:
    """True for URLs with a non-local protocol (``s3://``, ``gs://`` ...)."""
    protocol = fsspec.utils.get_protocol(url)
    return protocol not in ("file", "local")


# One filesystem per (protocol, endpoint, retries) and process: creating an
# s3fs client costs a second of CPU (botocore loads its service models).
_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(url: str, *, internal_retries: int = 5) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it for ``url``.

    ``internal_retries`` is s3fs's own retry count for a call; stores pass 1
    because they wrap calls in their own :class:`RetryPolicy`.
    """
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("S3_ENDPOINT_URL")
        cache_key = (protocol, endpoint, internal_retries)
        fs = _FILESYSTEMS.get(cache_key)
        if fs is None:
            options: dict = {
                # Our own instance: we set ``retries`` on it, which fsspec's
                # shared instance cache would leak to every other user.
                "skip_instance_cache": True,
                # Other processes (workers) write the keys we check: no stale listings.
                "use_listings_cache": False,
                # botocore's retries stacked on ours would make a failing upload
                # take minutes; one attempt per call, our loop does the rest.
                "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}},
            }
            if endpoint:
                options["client_kwargs"] = {"endpoint_url": endpoint}
            fs = fsspec.filesystem(protocol, **options)
            fs.retries = max(1, internal_retries)
            _FILESYSTEMS[cache_key] = fs
        return fs, fs._strip_protocol(url)
    if not is_remote(url):
        path = os.path.abspath(url.removeprefix("file://"))
        return fsspec.filesystem("file"), path
    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    """Join URL/path parts with '/' (object keys never use os.sep)."""
    out = url.rstrip("/")
    for part in parts:
        if part:
            out = f"{out}/{part.strip('/')}"
    return out


class Store:
    """A root (local directory or remote URL) holding keys like ``wiki/index.json``."""

    def __init__(self, url: str, retry: RetryPolicy = RetryPolicy()):
        self.remote = is_remote(url)
        self.retry = retry
        self.fs, self.root = filesystem(url, internal_retries=1)
        # The user-facing spelling, used in every message.
        self.url = url.rstrip("/") if self.remote else self.root

    # -- naming ---------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of ``key`` (local path, or ``bucket/prefix/key``)."""
        return join(self.root, key) if self.remote else os.path.join(self.root, *key.split("/"))

    def url_of(self, key: str) -> str:
        return join(self.url, key)

    def sub(self, key: str) -> "Store":
        """The store rooted at ``key`` (shares the retry policy)."""
        return Store(self.url_of(key), self.retry)

    def require_bucket(self, field: str) -> None:
        """Fail early, naming ``field``, when a remote root's bucket is missing."""
        if not self.remote:
            return
        from titan_moe.errors import ConfigError

        bucket = self.root.split("/", 1)[0]
        if not self._retrying("check", "", lambda: self.fs.exists(bucket)):
            where = os.environ.get("S3_ENDPOINT_URL") or "the default endpoint"
            raise ConfigError(field, f"bucket {bucket!r} does not exist at {where}; create it or fix the URL")

    # -- reads ----------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._retrying("check", key, lambda: self.fs.exists(self.path(key)))

    def size(self, key: str) -> int | None:
        def do() -> int | None:
            try:
                return int(self.fs.size(self.path(key)))
            except FileNotFoundError:
                return None

        return self._retrying("stat", key, do)

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

        def do() -> bytes | None:
            try:
                return self.fs.cat_file(self.path(key))
            except FileNotFoundError:
                return None

        return self._retrying("read", key, do)

    def open_read(self, key: str) -> IO[bytes]:
        return self.fs.open(self.path(key), "rb")

    # -- writes ---------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically replace ``key`` with ``data``."""
        if not self.remote:
            target = self.path(key)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            return
        self._retrying("upload", key, lambda: self.fs.pipe_file(self.path(key), data))

    def put_file(self, local_path: str, key: str, *, move: bool = False) -> None:
        """Atomically publish a local file as ``key`` (``move`` consumes it)."""
        if not self.remote:
            target = self.path(key)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if move:
                try:
                    os.replace(local_path, target)
                    return
                except OSError:  # another filesystem: fall back to copy + rename
                    pass
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, target)
            if move:
                os.remove(local_path)
            return
        self._retrying("upload", key, lambda: self.fs.put_file(local_path, self.path(key)))
        if move:
            os.remove(local_path)

    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        def do() -> None:
            try:
                self.fs.rm_file(self.path(key))
            except FileNotFoundError:
                pass

        self._retrying("delete", key, do)

    def delete_tree(self, key: str) -> None:
        """Remove everything under ``key`` (missing is fine)."""
        path = self.path(key)
        if not self.remote:
            shutil.rmtree(path, ignore_errors=True)
            return

        def do() -> None:
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

        self._retrying("delete", key, do)

    def local_scratch(self, key: str) -> str:
        """A fresh local directory for files on their way into this store.

        Local stores get one under ``key`` inside the root (same filesystem,
        so publishing is a rename); remote ones a temporary directory here.
        """
        if self.remote:
            return tempfile.mkdtemp(prefix="titan-moe-prep-")
        base = self.path(key)
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix="staging-", dir=base)

    # -- retries --------------------------------------------------------------
    def _retrying(self, verb: str, key: str, fn: Callable[[], T]) -> T:
        if not self.remote:
            return fn()
        policy = self.retry
        last: BaseException | None = None
        for attempt in range(policy.attempts):
            try:
                return fn()
            except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
                # Missing buckets and denied access do not heal by retrying.
                raise StorageError(f"could not {verb} {self.url_of(key)}: {type(exc).__name__}: {exc}") from exc
            except Exception as exc:  # connection resets, timeouts, 5xx
                last = exc
                if attempt + 1 < policy.attempts:
                    time.sleep(policy.sleep_s(attempt))
        raise StorageError(
            f"could not {verb} {self.url_of(key)} after {policy.attempts} attempts "
            f"(--retries {policy.retries}): {type(last).__name__}: {last}"
        ) from last

"""Local paths and object-store URLs: the one storage module of prep, loader and checkpoints.

Settings every caller shares:

* ``S3_ENDPOINT_URL`` points s3fs at non-AWS stores (MinIO, Ceph, moto), plus
  the usual ``AWS_*`` credentials; MosaicML Streaming's shard downloader
  honours the same variable, so one setting serves prep, loader and checkpoints.
* :class:`RetryPolicy`: a failed call is retried a bounded number of times with
  exponential backoff, then fails with :class:`StorageError` naming the object.
  botocore's and s3fs's own retry loops are off for stores built here, so the
  bound is ours and a dead store fails fast.
* Failures are told apart (:func:`classify`): a missing bucket, denied access
  and an unreachable endpoint never heal by retrying and are reported at once,
  each with its own message; connection resets, timeouts and 5xx are retried.

:class:`Store` adds the write guarantee prep relies on -- **atomic objects**: a
key holds either its complete new content or its old one (locally a temp file
named ``*.tmp-<pid>`` then ``os.replace``; on object storage one PUT).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, TypeVar

import fsspec

T = TypeVar("T")

# The suffix of every temporary file a Store writes: ``<name>.tmp-<pid>``.
TMP_MARK = ".tmp-"


class StorageError(RuntimeError):
    """A read or write that failed for good; the message names the object."""


@dataclass(frozen=True)
class RetryPolicy:
    """How object-storage calls are retried.

    A failed call is tried ``retries`` more times, sleeping
    ``backoff_s * 2**attempt`` (capped at ``max_backoff_s``) in between, then
    fails with an error naming the object.  Bounded on purpose: a store that
    is down should stop the run quickly, and a re-run resumes it.
    """

    retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def sleep_s(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), self.max_backoff_s)


def is_url(path: str) -> bool:
    """An object-store or other fsspec URL, as opposed to a local path (``file://`` counts as local)."""
    return "://" in path and fsspec.utils.get_protocol(path) not in ("file", "local")


def endpoint() -> str:
    """Where s3:// URLs go, for messages."""
    return os.environ.get("S3_ENDPOINT_URL") or "the default AWS endpoint"


def storage_options(path: str) -> dict[str, Any]:
    """fsspec options for ``path``: the S3 endpoint for s3 URLs, nothing otherwise."""
    if fsspec.utils.get_protocol(path) in ("s3", "s3a") and os.environ.get("S3_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["S3_ENDPOINT_URL"]}}
    return {}


# One bounded-retry filesystem per (protocol, endpoint, retries) and process:
# creating an s3fs client costs a second of CPU (botocore loads its models).
_BOUNDED: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(path: str, *, retries: int | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``path`` and the path as that filesystem names it.

    ``retries=None``: fsspec's shared instance with its default retries (the
    checkpoint code).  An int: an s3 client of our own whose every call is
    tried ``retries`` times by s3fs and once by botocore (stores built here
    wrap calls in their :class:`RetryPolicy`, so they pass 1).
    """
    if not is_url(path):
        return fsspec.filesystem("file"), os.path.abspath(path.removeprefix("file://"))
    protocol = fsspec.utils.get_protocol(path)
    if retries is None or protocol not in ("s3", "s3a"):
        return fsspec.core.url_to_fs(path, **storage_options(path))
    key = (protocol, os.environ.get("S3_ENDPOINT_URL"), retries)
    fs = _BOUNDED.get(key)
    if fs is None:
        fs = fsspec.filesystem(
            protocol,
            # Our own instance: the retry count set below must not leak to fsspec's shared one.
            skip_instance_cache=True,
            # Other processes (workers, other shards) write the keys we check: no stale listings.
            use_listings_cache=False,
            config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}},
            **storage_options(path),
        )
        fs.retries = max(1, retries)
        _BOUNDED[key] = fs
    return fs, fs._strip_protocol(path)


def join(base: str, *parts: str) -> str:
    """Join with '/' for URLs (object keys never use os.sep), os.path.join for local paths."""
    parts = tuple(p.strip("/") for p in parts if p)
    return posixpath.join(base.rstrip("/"), *parts) if is_url(base) else os.path.join(base, *parts)


def read_bytes(path: str) -> bytes:
    """A whole small object (a manifest, an index) from a local path or a URL."""
    if not is_url(path):
        with open(path.removeprefix("file://"), "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return f.read()


def write_json(path: str, obj: Any) -> None:
    fs, p = filesystem(path)
    # One PUT on object stores; on a filesystem, write-then-rename so readers never see half a file.
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if is_url(path):
        fs.pipe_file(p, data)
    else:
        tmp = f"{p}{TMP_MARK}{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


def read_json(path: str) -> Any:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def file_sizes(path: str) -> dict[str, int]:
    """Every file below ``path`` with its size, keyed by path relative to ``path``."""
    fs, root = filesystem(path)
    if not fs.exists(root):
        return {}
    root = root.rstrip("/")
    sizes = {}
    for name, info in fs.find(root, detail=True).items():
        rel = name[len(root):].lstrip("/")
        sizes[rel] = int(info.get("size") or 0)
    return sizes


# -- telling failures apart ----------------------------------------------------

NO_BUCKET, DENIED, UNREACHABLE, TRANSIENT = "no_bucket", "denied", "unreachable", "transient"
_UNREACHABLE_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                      "ConnectionRefusedError", "gaierror", "ServerTimeoutError", "ClientConnectorDNSError")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def classify(exc: BaseException) -> str:
    """``no_bucket``, ``denied``, ``unreachable`` (never retried) or ``transient``."""
    for e in _chain(exc):
        text = f"{type(e).__name__} {e}"
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            return NO_BUCKET
        if isinstance(e, PermissionError) or any(
                code in text for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")):
            return DENIED
        if any(name in text for name in _UNREACHABLE_NAMES):
            return UNREACHABLE
    return TRANSIENT


def explain(kind: str, url: str, exc: BaseException) -> str:
    """The message a user needs for a failure of ``kind`` on ``url``."""
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    detail = f"{type(exc).__name__}: {exc}"
    if kind == NO_BUCKET:
        return f"bucket {bucket!r} does not exist at {endpoint()} ({url}); create it or fix the URL"
    if kind == DENIED:
        return (f"access denied to {url} at {endpoint()}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                f"(or the pod's credentials) and the bucket policy ({detail})")
    if kind == UNREACHABLE:
        return (f"endpoint unreachable: cannot connect to {endpoint()} for {url}; check S3_ENDPOINT_URL "
                f"and the network ({detail})")
    return detail


class Store:
    """A root (local directory or remote URL) holding keys like ``wiki/index.json``."""

    def __init__(self, url: str, retry: RetryPolicy = RetryPolicy()):
        self.remote = is_url(url)
        self.retry = retry
        self.fs, self.root = filesystem(url, retries=1)
        # The user-facing spelling, used in every message.
        self.url = url.rstrip("/") if self.remote else self.root

    # -- naming ---------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of ``key`` (local path, or ``bucket/prefix/key``)."""
        if not key:
            return self.root
        return f"{self.root.rstrip('/')}/{key}" if self.remote else os.path.join(self.root, *key.split("/"))

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def check_access(self, field: str) -> None:
        """Fail early, naming ``field``, when a remote root cannot be listed.

        A missing bucket, denied credentials and an unreachable endpoint each
        get their own :class:`StorageError` message.
        """
        if not self.remote:
            return
        self._retrying("list", "", lambda: self.fs.ls(self.root.split("/", 1)[0], detail=False), field=field)

    # -- reads ----------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.size(key) is not None

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

    def list_dirs(self, key: str = "") -> list[str]:
        """Names of the directories (prefixes) directly under ``key``."""
        def do() -> list[str]:
            try:
                entries = self.fs.ls(self.path(key), detail=True)
            except FileNotFoundError:
                return []
            return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

        return self._retrying("list", key, do)

    def list_files(self, key: str = "") -> list[str]:
        """Names of the files (objects) directly under ``key``."""
        def do() -> list[str]:
            try:
                entries = self.fs.ls(self.path(key), detail=True)
            except FileNotFoundError:
                return []
            return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")

        return self._retrying("list", key, do)

    def open_read(self, key: str) -> IO[bytes]:
        return self.fs.open(self.path(key), "rb")

    # -- writes ---------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically replace ``key`` with ``data``."""
        if not self.remote:
            target = self.path(key)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}{TMP_MARK}{os.getpid()}"
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
            tmp = f"{target}{TMP_MARK}{os.getpid()}"
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

    # -- retries --------------------------------------------------------------
    def _retrying(self, verb: str, key: str, fn: Callable[[], T], *, field: str = "") -> T:
        if not self.remote:
            return fn()
        policy = self.retry
        url = self.url_of(key)
        prefix = f"{field}: " if field else ""
        last: BaseException | None = None
        for attempt in range(policy.attempts):
            try:
                return fn()
            except Exception as exc:
                kind = classify(exc)
                if kind != TRANSIENT:
                    # A missing bucket, denied access or a dead endpoint does not heal by retrying.
                    raise StorageError(f"{prefix}could not {verb} {url}: {explain(kind, url, exc)}") from exc
                if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
                    raise StorageError(f"{prefix}could not {verb} {url}: {type(exc).__name__}: {exc}") from exc
                last = exc  # connection resets, timeouts, 5xx
                if attempt + 1 < policy.attempts:
                    time.sleep(policy.sleep_s(attempt))
        raise StorageError(
            f"{prefix}could not {verb} {url} after {policy.attempts} attempts "
            f"(--retries {policy.retries}): {type(last).__name__}: {last}"
        ) from last

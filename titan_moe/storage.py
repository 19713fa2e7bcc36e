"""Paths that may be local directories or object-store URLs (``s3://...``).

Shared by the trainer's data loader and checkpoints.  Non-AWS stores are
reached through ``S3_ENDPOINT_URL`` (the variable MosaicML Streaming's S3
downloader honours for shards) plus the usual AWS credential variables.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec


def is_url(path: str) -> bool:
    """An object-store or other fsspec URL, as opposed to a local path (``file://`` counts as local)."""
    return "://" in path and fsspec.utils.get_protocol(path) not in ("file", "local")


def storage_options(path: str) -> dict[str, Any]:
    """fsspec options for ``path``: the S3 endpoint for s3 URLs, nothing otherwise."""
    if fsspec.utils.get_protocol(path) in ("s3", "s3a") and os.environ.get("S3_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["S3_ENDPOINT_URL"]}}
    return {}


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``path`` and the path as that filesystem names it."""
    fs, root = fsspec.core.url_to_fs(path, **storage_options(path))
    return fs, root


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


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
        tmp = p + ".tmp"
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

"""A small writer for MosaicML Streaming's MDS format (fixed-size columns only).

Why not ``streaming.MDSWriter``?  Importing ``streaming`` imports torch and
transformers (10-15 s of CPU before the first shard), and its remote mode
uploads ``index.json`` while shard uploads may still be in flight and reports
a failed upload as "one of the threads failed".  Prep needs neither: it writes
two fixed-size columns and publishes each shard itself, in order.  The bytes
written are exactly MDSWriter's (tests compare the decompressed shards and the
index with MDSWriter's output, and read the streams back with
``streaming.StreamingDataset``).

Shard layout (``shard.NNNNN.mds`` before compression)::

    u32 num_samples | u32 offsets[num_samples + 1] | config JSON | samples

where each sample is the concatenation of its columns in sorted column-name
order (fixed-size columns carry no per-sample size header) and offsets are
absolute byte positions in the shard.  The same config JSON, plus ``samples``,
``raw_data`` and ``zip_data`` (basename, bytes, hashes), forms each shard's
entry in ``index.json`` (``{"version": 2, "shards": [...]}``, sorted keys).
A shard is closed before the sample that would push it past ``size_limit``
bytes, counting 4 bytes of offset per sample and the header, as MDSWriter does.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np
import xxhash  # a dependency of mosaicml-streaming; MDS's fast hash
import zstandard

HASHES = ["sha1", "xxh64"]
ZSTD_LEVEL = 3  # streaming's "zstd" means level 3
def column_size(encoding: str) -> int:
    """Bytes per value of a fixed-size MDS encoding (``int32``, ``ndarray:uint16:4096``)."""
    scalars = {"int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4,
               "uint64": 8, "float32": 4, "float64": 8}
    if encoding in scalars:
        return scalars[encoding]
    parts = encoding.split(":")
    if len(parts) == 3 and parts[0] == "ndarray" and parts[1] in scalars:
        return scalars[parts[1]] * int(np.prod([int(d) for d in parts[2].split(",")]))
    raise ValueError(f"{encoding!r} is not a fixed-size MDS encoding this writer supports")


def _file_info(data: bytes, basename: str) -> dict:
    return {
        "basename": basename,
        "bytes": len(data),
        "hashes": {"sha1": hashlib.sha1(data).hexdigest(), "xxh64": xxhash.xxh64(data).hexdigest()},
    }


class MDSShardWriter:
    """Collect samples, write zstd shards into ``directory``, hand each to ``publish``.

    ``publish(basename)`` is called once per shard, right after it is written
    (it may move the file away).  ``finish()`` writes ``index.json`` into
    ``directory`` and returns its content; publishing it is the caller's job,
    after every shard has been published.
    """

    def __init__(self, directory: str, columns: dict[str, str], size_limit: int,
                 publish: Callable[[str], None], prefix: str = ""):
        self.directory = directory
        self.prefix = prefix  # shard names are shard.<prefix>NNNNN.mds(.zstd)
        self.names = sorted(columns)
        self.sizes = [column_size(columns[name]) for name in self.names]
        self.size_limit = size_limit
        self.publish = publish
        self.config = {
            "version": 2,
            "format": "mds",
            "compression": "zstd",
            "hashes": HASHES,
            "size_limit": size_limit,
            "column_names": self.names,
            "column_encodings": [columns[name] for name in self.names],
            "column_sizes": self.sizes,
        }
        self.config_bytes = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.header_bytes = 4 + 4 + len(self.config_bytes)  # num_samples, first offset, config
        sample_bytes = sum(self.sizes) + 4
        if size_limit < self.header_bytes + sample_bytes:
            raise ValueError(f"shard size {size_limit} bytes cannot hold one {sample_bytes}-byte sample")
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.shards: list[dict] = []
        self.samples: list[bytes] = []
        self.shard_bytes = self.header_bytes

    def write(self, values: dict[str, bytes]) -> None:
        """Add one sample, given each column's encoded bytes."""
        data = b"".join(values[name] for name in self.names)
        if len(data) != sum(self.sizes):
            raise ValueError(f"sample of {len(data)} bytes, columns {self.names} take {sum(self.sizes)}")
        if self.size_limit < self.shard_bytes + len(data) + 4:
            self._flush()
        self.samples.append(data)
        self.shard_bytes += len(data) + 4

    def _flush(self) -> None:
        n = len(self.samples)
        sizes = np.array([0] + [len(s) for s in self.samples], dtype=np.int64)
        offsets = (sizes.cumsum() + 4 + 4 * (n + 1) + len(self.config_bytes)).astype("<u4")
        raw = np.uint32(n).astype("<u4").tobytes() + offsets.tobytes() + self.config_bytes + b"".join(self.samples)
        raw_name = f"shard.{self.prefix}{len(self.shards):05}.mds"
        zip_name = f"{raw_name}.zstd"
        compressed = self.compressor.compress(raw)
        with open(os.path.join(self.directory, zip_name), "wb") as f:
            f.write(compressed)
        self.shards.append({
            **self.config,
            "samples": n,
            "raw_data": _file_info(raw, raw_name),
            "zip_data": _file_info(compressed, zip_name),
        })
        self.samples = []
        self.shard_bytes = self.header_bytes
        self.publish(zip_name)

    def close(self) -> list[dict]:
        """Flush the last shard; returns every shard's index entry."""
        if self.samples:
            self._flush()
        return self.shards

    def finish(self) -> dict:
        """``close()``, then write ``index.json`` into the directory (a single-writer stream)."""
        index = index_json(self.close())
        with open(os.path.join(self.directory, "index.json"), "wb") as f:
            f.write(index)
        return json.loads(index)


def index_json(shards: list[dict]) -> bytes:
    """An MDS ``index.json`` over shard entries, as MDSWriter spells it (sorted keys)."""
    return json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode()

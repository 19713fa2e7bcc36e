"""MosaicML's ``StreamingDataset`` opened in O(shards) time and memory with a small constant.

Two costs of the stock constructor grow past what a training rank can pay at
OLMoE-mix scale (~1B samples in ~150k shards):

**Sample lookup.**
``StreamingDataset.__init__`` builds a ``streaming.base.spanner.Spanner``,
which materialises one int64 per sample (``np.repeat`` of the shard ids) plus
one small array per 1024 samples: at ~1B samples that is a ~9 GB, ~30 s
spike on every rank at startup.  The lookup it serves needs only the shard
boundaries: :class:`ShardSpanner` keeps the per-shard cumulative counts and
answers with ``np.searchsorted`` (O(log shards) per lookup, 8 bytes per shard).

**Shard readers.**  ``Stream.get_shards`` builds each shard's reader with
``MDSReader.from_json``, which deep-copies the shard's JSON first: ~0.3 ms a
shard, ~45 s at 150k shards.  :class:`IndexedStream` (a ``Stream`` subclass,
streaming's extension point for streams) builds the same ``MDSReader`` from
shallow copies, and reads an ``index.json`` that the shard store's local
leader has already placed in the cache (checked against the sha256 the
manifest check recorded), so no rank downloads it again.

:func:`streaming_dataset` builds a ``StreamingDataset`` with it.  Streaming
constructs its Spanner inside ``__init__`` and offers no hook, so the class is
swapped in its module for the duration of the constructor (under a lock, as
the swap is process-wide).  Streaming uses the spanner only through
``spanner[sample_id] -> (shard_id, index_in_shard)``, which this class
provides with the same results and errors (tested against the original).
Pinned to mosaicml-streaming 0.13 in ``uv.lock``.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

_SWAP_LOCK = threading.Lock()


class ShardSpanner:
    """``spanner[i] -> (shard, index within shard)`` from per-shard sample counts."""

    def __init__(self, shard_sizes: np.ndarray, span_size: int = 0) -> None:
        del span_size  # streaming's bucket size; no buckets here
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.shard_sizes = sizes
        self.shard_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(sizes)])
        self.num_samples = int(self.shard_bounds[-1])

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not (0 <= index < self.num_samples):
            raise IndexError(f"Invalid sample index `{index}`: 0 <= {index} < {self.num_samples}")
        shard = int(np.searchsorted(self.shard_bounds, index, side="right")) - 1
        return shard, int(index - self.shard_bounds[shard])

    def shards_of(self, indices: np.ndarray) -> np.ndarray:
        """Vectorised shard ids of many sample indices."""
        return np.searchsorted(self.shard_bounds, indices, side="right") - 1


def _reader(local: str, split: str | None, info: dict):
    """``MDSReader.from_json`` without its deep copy (the JSON is ours and never mutated)."""
    from streaming.base.format.base.reader import FileInfo
    from streaming.base.format.mds.reader import MDSReader

    if info.get("version") != 2 or info.get("format") != "mds":
        raise ValueError(f"shard {info.get('raw_data')} is not an MDS version-2 shard")
    zip_data = info.get("zip_data")
    return MDSReader(
        dirname=local, split=split, column_encodings=info["column_encodings"], column_names=info["column_names"],
        column_sizes=info["column_sizes"], compression=info.get("compression"), hashes=info.get("hashes", []),
        raw_data=FileInfo(**info["raw_data"]), samples=info["samples"], size_limit=info.get("size_limit"),
        zip_data=FileInfo(**zip_data) if zip_data else None,
    )


_INDEXED_STREAM = None


def indexed_stream_class():
    """The :class:`IndexedStream` class (built on first use: importing streaming costs seconds)."""
    global _INDEXED_STREAM
    if _INDEXED_STREAM is not None:
        return _INDEXED_STREAM
    from streaming import Stream

    class IndexedStream(Stream):
        """A ``Stream`` whose ``index.json`` is already in ``local`` and whose readers are cheap."""

        def get_shards(self, world, allow_unsafe_types: bool):
            filename = os.path.join(self.local, self.split or "", "index.json")
            with open(filename, "rb") as f:
                obj = json.loads(f.read())
            if obj.get("version") != 2:
                raise ValueError(f"{filename}: unsupported MDS index version {obj.get('version')}")
            shards = []
            for info in obj["shards"]:
                shard = _reader(self.local, self.split, info)
                shard.validate(allow_unsafe_types)
                shards.append(shard)
            return shards

    _INDEXED_STREAM = IndexedStream
    return IndexedStream


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while building ~10^5 small objects (index JSON, readers).

    Each generation-0 collection would walk the young objects and, every few,
    the whole parsed index: most of the startup time at 150k shards.  Nothing
    built here forms reference cycles that need collecting.
    """
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _spanner_swapped() -> Iterator[None]:
    import streaming.base.dataset as dataset_module

    with _SWAP_LOCK:
        original = dataset_module.Spanner
        dataset_module.Spanner = ShardSpanner
        try:
            yield
        finally:
            dataset_module.Spanner = original


def streaming_dataset(**kwargs: Any):
    """``streaming.StreamingDataset(**kwargs)`` whose sample lookup is a :class:`ShardSpanner`."""
    from streaming import StreamingDataset

    with _spanner_swapped(), gc_paused():
        return StreamingDataset(**kwargs)

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

**Shard readers.**  ``Stream.get_shards`` downloads and parses ``index.json``
and builds every shard's reader with ``MDSReader.from_json``, which deep-copies
the shard's JSON first: ~0.3 ms a shard, ~45 s at 150k shards.
:class:`IndexedStream` (a ``Stream`` subclass, streaming's extension point
for streams) takes the shard entries the manifest check already parsed and
hands streaming :class:`LazyShard` objects, which build the same
``MDSReader`` (from shallow copies) only when a shard is first read.

:func:`streaming_dataset` builds a ``StreamingDataset`` with it.  Streaming
constructs its Spanner inside ``__init__`` and offers no hook, so the class is
swapped in its module for the duration of the constructor (under a lock, as
the swap is process-wide).  Streaming uses the spanner only through
``spanner[sample_id] -> (shard_id, index_in_shard)``, which this class
provides with the same results and errors (tested against the original).
Pinned to mosaicml-streaming 0.13 in ``uv.lock``.
"""

from __future__ import annotations

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


class LazyShard:
    """A shard reader built on first use: what streaming's constructor asks of 150k shards is cheap.

    ``StreamingDataset.__init__`` touches every shard only for ``len()``,
    ``.samples``, ``get_max_size()`` (with a cache limit) and, through
    :meth:`IndexedStream.set_up_local`, nothing for shards absent from the
    cache.  Those come from the index entry; any other attribute builds the
    ``MDSReader`` (once) and is served by it, so a shard that is read behaves
    exactly like streaming's own reader.
    """

    __slots__ = ("samples", "_local", "_split", "_info", "_reader")

    def __init__(self, local: str, split: str | None, info: dict) -> None:
        self.samples = info["samples"]
        self._local, self._split, self._info = local, split, info
        self._reader = None

    def __len__(self) -> int:
        return self.samples

    def get_max_size(self) -> int:
        """``Reader.get_max_size``: raw plus compressed bytes, from the index entry."""
        zip_data = self._info.get("zip_data")
        return self._info["raw_data"]["bytes"] + (zip_data["bytes"] if zip_data else 0)

    def files(self) -> tuple[str, ...]:
        """Basenames this shard may occupy in the cache."""
        return tuple(part["basename"] for part in (self._info["raw_data"], self._info.get("zip_data")) if part)

    @property
    def reader(self):
        if self._reader is None:
            self._reader = _reader(self._local, self._split, self._info)
        return self._reader

    # Python looks special methods up on the type, never through __getattr__.
    def __getitem__(self, at):
        return self.reader[at]

    def __iter__(self):
        return iter(self.reader)

    def __getattr__(self, name: str):
        # Only attributes not defined above reach here (the reader's methods and fields).
        return getattr(self.reader, name)


_INDEXED_STREAM = None


def indexed_stream_class():
    """The :class:`IndexedStream` class (built on first use: importing streaming costs seconds)."""
    global _INDEXED_STREAM
    if _INDEXED_STREAM is not None:
        return _INDEXED_STREAM
    from streaming import Stream

    class IndexedStream(Stream):
        """A ``Stream`` over an index the loader already parsed and checked, with lazy shard readers.

        ``shard_entries`` is the index's ``shards`` list (``StreamInfo.shard_entries``):
        parsing it once per rank, in the manifest check, is the only index read.
        """

        def __init__(self, *, shard_entries, **kwargs) -> None:
            super().__init__(**kwargs)
            self.shard_entries = shard_entries

        def get_shards(self, world, allow_unsafe_types: bool):
            shards = [LazyShard(self.local, self.split, info) for info in self.shard_entries]
            # Streaming validates every reader; the check reads only the column encodings,
            # so once per distinct list is enough (the manifest check made them one object).
            checked = None
            for shard in shards:
                if shard._info["column_encodings"] != checked:
                    shard.reader.validate(allow_unsafe_types)
                    checked = shard._info["column_encodings"]
            return shards

        def get_index_size(self) -> int:
            """Cache bytes of the index: none, it is never written to the cache."""
            return 0

        def set_up_local(self, shards, cache_usage_per_shard) -> None:
            """``Stream.set_up_local``, asking only the shards with a file in the cache.

            A shard none of whose files is listed is absent (usage 0) with no
            side effect in ``Reader.set_up_local``; the cache holds few shards
            (``cache_limit``), so the rest cost one set lookup each.
            """
            local_dirname = os.path.join(self.local, self.split)
            listing = set()
            names = set()
            for dirname, _, subfiles in os.walk(local_dirname):
                for subfile in subfiles:
                    listing.add(os.path.join(dirname, subfile))
                    if dirname == local_dirname:
                        names.add(subfile)
            cache_usage_per_shard[:] = 0
            if not names:  # a fresh cache: nothing to ask
                return
            for i, shard in enumerate(shards):
                if not names.isdisjoint(shard.files()):
                    cache_usage_per_shard[i] = shard.set_up_local(listing, self.safe_keep_zip)

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
    """``streaming.StreamingDataset(**kwargs)`` whose sample lookup is a :class:`ShardSpanner`.

    The class is ``cache_budget.BudgetedStreamingDataset``: the cache limit holds
    while downloads run concurrently.
    """
    from titan_moe.data.cache_budget import BudgetedStreamingDataset

    with _spanner_swapped(), gc_paused():
        return BudgetedStreamingDataset(**kwargs)

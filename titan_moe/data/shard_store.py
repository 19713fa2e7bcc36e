"""Random access to the MDS streams through this job's local shard cache.

MosaicML streaming does the I/O: ``StreamingDataset`` downloads shards from
a local directory or ``s3://`` (``S3_ENDPOINT_URL`` for non-AWS stores),
checks their hashes, decompresses them into the cache, evicts least-recently
used shards above ``cache_limit``, and coordinates the ranks of a node
through shared memory so each shard is fetched once per node.  We use it as
a map-style store (``get_item``), never its ``__iter__``: the order is ours
(``order.py``), so its epoch bookkeeping cannot silently restart the data.

Leftovers of a killed run are what streaming does not clean up: its
shared-memory registry still names our cache directories -- streaming then
refuses them ("Reused local directory") when the dead run had not yet
fetched a shard, and leaks them otherwise -- and half-finished downloads
linger.  Before opening the streams, the node's local leader

1. takes an exclusive ``flock`` on ``<cache>/.owner.lock`` -- the kernel drops
   it when a process dies, so holding it proves no live process uses this
   cache (a live one makes this a clear error instead);
2. unlinks the shared memory (and ``/tmp`` file locks) of every streaming
   registration that names one of our directories -- stale by (1), and only
   ours: other jobs' segments are never touched (streaming's own
   ``clean_stale_shared_memory`` would wipe every job on the node);
3. deletes cache files the current index does not name (temporary download
   files, shards of another prep version) and the cached ``index.json``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import tempfile
import threading

import numpy as np
import torch.distributed as dist

from titan_moe.data.config import DataConfig
from titan_moe.common.units import parse_bytes
from titan_moe.data.manifest import PrepOutput, pick_hash
from titan_moe.data.fast_streaming import indexed_stream_class, streaming_dataset
from titan_moe.common.errors import ConfigError

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_LOCALS = re.compile(r"^(\d+)_locals$")


def _is_local_leader() -> bool:
    # The same rule streaming's World uses (RANK % LOCAL_WORLD_SIZE == 0), so the
    # process that cleans up is the one that then registers the shared memory.
    rank = int(os.environ.get("RANK", 0))
    return rank % int(os.environ.get("LOCAL_WORLD_SIZE", 1)) == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _registered_locals(path: str) -> list[str]:
    """The local directories a streaming ``<prefix>_locals`` segment registers."""
    with open(path, "rb") as f:
        data = f.read()
    size = int(np.frombuffer(data[:4], np.int32)[0])
    return data[4:size].decode("utf-8", "replace").split("\0")[:-1]


def reap_stale_shared_memory(local_dirs: list[str]) -> int:
    """Remove streaming shared memory registered for ``local_dirs``; returns segments removed.

    Call only while holding the cache's owner lock: it proves the registrant is dead.
    """
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

    if not os.path.isdir(SHM_DIR):  # not Linux: nothing we can inspect
        return 0
    ours = {os.path.abspath(d) for d in local_dirs}
    removed = 0
    for name in os.listdir(SHM_DIR):
        match = _LOCALS.match(name)
        if not match:
            continue
        try:
            if not ours.intersection(_registered_locals(os.path.join(SHM_DIR, name))):
                continue
        except (OSError, ValueError, IndexError):
            continue
        prefix = match.group(1)
        for suffix in SHM_TO_CLEAN:
            try:
                os.unlink(os.path.join(SHM_DIR, f"{prefix}_{suffix}"))
                removed += 1
            except FileNotFoundError:
                pass
        for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
            try:
                os.unlink(os.path.join(tempfile.gettempdir(), f"{prefix}_{lock}"))
            except FileNotFoundError:
                pass
    return removed


def tidy_cache(local_dir: str, keep: frozenset[str]) -> int:
    """Delete files in a stream's cache dir that are not shards of the current index.

    Returns how many were leftovers (temporary or foreign files); the cached
    ``index.json`` is always dropped too, so the remote's current one is read.
    """
    removed = 0
    if not os.path.isdir(local_dir):
        return 0
    for name in os.listdir(local_dir):
        path = os.path.join(local_dir, name)
        if name not in keep and os.path.isfile(path):
            os.unlink(path)
            removed += name != "index.json"
    return removed


class CacheClaim:
    """This process's exclusive claim on a cache directory (released on close or death)."""

    def __init__(self, cache_dir: str, field: str = "data.local_cache"):
        os.makedirs(cache_dir, exist_ok=True)
        self.path = os.path.join(cache_dir, ".owner.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            who = (f"an earlier loader of this process (pid {owner}) that was not closed"
                   if owner == str(os.getpid()) else f"another live process on this node (pid {owner})")
            raise ConfigError(
                field,
                f"the shard cache {cache_dir} is in use by {who}; give every job its own local_cache",
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


class ShardStore:
    """Sample ``i`` of source ``s`` of a prep output, read through a local shard cache.

    Every process on a node must build its store at the same point (the
    constructor holds collective barriers when torch.distributed is up), with
    the same ``cache_dir``.
    """

    def __init__(self, prep: PrepOutput, names: list[str], cache_dir: str, *,
                 cache_limit: int | None = None, validate_hash: str | None = None,
                 download_timeout: float = 300.0, field: str = "data.local_cache"):
        self.names = list(names)
        self.seq_len = prep.seq_len
        self.cache_dir = os.path.abspath(cache_dir)
        self.local_dirs = local_dirs = [os.path.join(self.cache_dir, n) for n in self.names]
        self._claim = None
        if _is_local_leader():
            self._claim = CacheClaim(self.cache_dir, field)
            reaped = reap_stale_shared_memory(local_dirs)
            tidied = sum(
                tidy_cache(d, prep.streams[n].shard_files) for d, n in zip(local_dirs, self.names)
            )
            if reaped or tidied:
                logger.warning(
                    f"cache {self.cache_dir}: removed {reaped} stale shared-memory segments and "
                    f"{tidied} leftover files of an earlier run"
                )
        _barrier()
        stream_class = indexed_stream_class()
        streams = [
            stream_class(
                remote=_as_remote(prep.streams[n].url),
                local=d,
                download_retry=2,
                download_timeout=download_timeout,
                validate_hash=validate_hash,
                shard_entries=prep.streams[n].shard_entries,
            )
            for n, d in zip(self.names, local_dirs)
        ]
        try:
            # batch_size only matters to StreamingDataset.__iter__, which we never call.
            # O(shards) sample lookup instead of streaming's one int64 per sample (spanner.py).
            self.dataset = streaming_dataset(streams=streams, batch_size=1, cache_limit=cache_limit)
        except BaseException as exc:
            if self._claim is not None:  # let a retry in this process claim the cache again
                self._claim.release()
            if isinstance(exc, ValueError) and "cache" in str(exc).lower() and "limit" in str(exc).lower():
                raise ConfigError("data.cache_limit", str(exc)) from None
            raise
        self.offsets = self.dataset.sample_offset_per_stream.copy()
        self._prefetch_queue: queue.Queue[int | None] = queue.Queue()
        self._queued: set[int] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._prefetch_loop, name="shard-prefetch", daemon=True)
        self._thread.start()

    # -- reading --------------------------------------------------------------
    def read(self, source: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[n, seq_len]`` (int64, a fresh writable array) and ``num_valid [n]``."""
        if self._error is not None:
            raise RuntimeError(f"shard prefetch failed: {self._error}") from self._error
        tokens = np.empty((len(source), self.seq_len), dtype=np.int64)
        num_valid = np.empty(len(source), dtype=np.int64)
        for row, (s, i) in enumerate(zip(source.tolist(), sample.tolist())):
            item = self.dataset.get_item(int(self.offsets[s]) + i)
            ids = item["tokens"]
            if isinstance(ids, bytes):  # llm-foundry's older `bytes` column: int64 ids
                ids = np.frombuffer(ids, dtype=np.int64)
            if len(ids) != self.seq_len:
                raise ConfigError(
                    "training.seq_len",
                    f"is {self.seq_len} but sample {i} of stream {self.names[s]!r} holds {len(ids)} tokens; "
                    f"set training.seq_len = {len(ids)} (the dataset's --concat_tokens)",
                )
            # MDS decodes into a read-only view of the shard; assigning copies and widens
            # uint16/uint32/int32 -> int64 by value (never a reinterpreting view).
            tokens[row] = ids
            # No num_valid column (llm-foundry): every token is real.
            num_valid[row] = int(item["num_valid"]) if "num_valid" in item else self.seq_len
        return tokens, num_valid

    def shard_of(self, source: int, sample: int) -> int:
        return int(self.dataset.spanner[int(self.offsets[source]) + sample][0])

    # -- background download ----------------------------------------------------
    def prefetch(self, source: np.ndarray, sample: np.ndarray) -> None:
        """Start downloading the shards of these samples (no-op for shards already queued)."""
        for shard in self.dataset.spanner.shards_of(self.offsets[source] + sample).tolist():
            if shard not in self._queued:
                if len(self._queued) > 4096:
                    self._queued.clear()
                self._queued.add(shard)
                self._prefetch_queue.put(shard)

    def _prefetch_loop(self) -> None:
        while True:
            shard = self._prefetch_queue.get()
            if shard is None:
                return
            try:
                # Non-blocking: if another rank of the node is fetching it, move on.
                self.dataset.prepare_shard(shard, blocking=False)
            except BaseException as exc:  # surfaced on the next read()
                self._error = exc
                return

    def close(self) -> None:
        """Stop prefetching, drop streaming's shared memory, release the cache (idempotent).

        Streaming itself unlinks its shared memory only at process exit; a
        process that opens the same cache again (a test, a re-built loader)
        would otherwise meet its own registration.  Unlinking is safe while
        other local ranks still read: their mappings outlive the names.
        """
        if self._thread.is_alive():
            self._prefetch_queue.put(None)
            self._thread.join(timeout=60)
        if self._claim is not None:
            _unlink_own_shared_memory(self.dataset._shm_prefix_int)
            self._claim.release()
            self._claim = None


def _unlink_own_shared_memory(prefix: int) -> None:
    """Unlink the segments this process (the local leader) created for its dataset.

    Also tells Python's resource tracker, which registered them at creation
    and would otherwise try to unlink them again at exit (and warn).
    """
    from multiprocessing import resource_tracker

    from streaming.base.constant import SHM_TO_CLEAN

    for suffix in SHM_TO_CLEAN:
        name = f"{prefix:06}_{suffix}"
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue
        resource_tracker.unregister(f"/{name}", "shared_memory")


def _as_remote(url: str) -> str:
    """Streaming copies from a local 'remote' into the cache: keeps the prep output read-only."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def open_store(prep: PrepOutput, names: list[str], cache_dir: str, config: DataConfig) -> ShardStore:
    limit = parse_bytes(config.cache_limit, "data.cache_limit") if config.cache_limit else None
    if limit is not None:
        # Streaming needs room for a few shards in flight (raw + compressed while
        # decompressing); below that it thrashes or fails mid-run.  Say so up front.
        biggest = max((prep.streams[n] for n in names), key=lambda s: s.max_shard_bytes)
        need = 4 * biggest.max_shard_bytes  # (the indexes are read from the prep output, not cached)
        if limit < need:
            raise ConfigError(
                "data.cache_limit",
                f"{config.cache_limit} is below 4 x the largest shard ({biggest.max_shard_bytes} bytes "
                f"raw + compressed, stream {biggest.name!r}); raise it to at least {need} bytes",
            )
    return ShardStore(
        prep,
        names,
        cache_dir,
        cache_limit=limit,
        validate_hash=pick_hash(config.validate_hash, [prep.streams[n] for n in names]),
        download_timeout=config.download_timeout,
    )

"""A shard cache that stays under ``data.cache_limit`` while several downloads run at once.

MosaicML Streaming 0.13 makes room for a shard (evicting the coldest local
shards) under its cache lock, then releases the lock and downloads.  The
space is not held for the download in flight, so a second download that
starts meanwhile -- the loader's prefetch thread and a read that needs a
shard now, or another rank of the node -- sees the same free space and both
land: the cache overshoots its limit by up to one shard per concurrent
download (measured in CI: 11,532 bytes in an 11,264-byte cache).

:class:`BudgetedStreamingDataset` reserves the shard's worst-case size
(its compressed plus decompressed bytes, what streaming itself budgets)
in ``cache_usage`` before it releases the lock, and settles to the real size
when the download is done.  When the in-flight reservations leave no room
and no local shard is left to evict, a blocking caller waits for a download
to finish instead of overshooting; a non-blocking one (prefetch) returns
and the shard is fetched when it is read.  A local shard is touched (its
access time, for eviction order) under the same single lock acquisition;
a local shard present only as its zip goes through streaming's own method,
which decompresses it.

Imported only when a store is built (importing streaming costs seconds).
"""

from __future__ import annotations

import os
from time import sleep, time_ns

from filelock import FileLock
from streaming import StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState


class BudgetedStreamingDataset(StreamingDataset):
    """``StreamingDataset`` whose ``prepare_shard`` never lets the cache exceed ``cache_limit``."""

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        if not self.cache_limit:
            super().prepare_shard(shard_id, blocking)
            return
        need = self.shards[shard_id].get_max_size()
        while True:
            with self._cache_lock():
                state = self._shard_states[shard_id]
                if state == _ShardState.LOCAL and self._raw_present(shard_id):
                    self._shard_access_times[shard_id] = time_ns()  # the common case: a read touches it
                    return
                if state == _ShardState.REMOTE and self._make_room(need):
                    self._shard_states[shard_id] = _ShardState.PREPARING
                    self.cache_usage += need  # held for this download until it settles
                    break
            if state == _ShardState.LOCAL:
                super().prepare_shard(shard_id, blocking)  # only its zip is here: streaming decompresses it
                return
            if not blocking:
                return  # being fetched elsewhere, or no room yet: the read fetches it
            sleep(TICK)
        stream = self.streams[self.stream_per_shard[shard_id]]
        try:
            delta = stream.prepare_shard(self.shards[shard_id])
        except BaseException:
            with self._cache_lock():
                self.cache_usage -= need
                self._shard_states[shard_id] = _ShardState.REMOTE
            raise
        with self._cache_lock():
            self.cache_usage += delta - need
            self._shard_access_times[shard_id] = time_ns()
            self._shard_states[shard_id] = _ShardState.LOCAL

    def _make_room(self, need: int) -> bool:
        """Evict the coldest local shards until ``need`` more bytes fit; False if only downloads hold the space.

        Call with the cache lock held.
        """
        while self.cache_usage + need > self.cache_limit:
            if not (self._shard_states.numpy() == _ShardState.LOCAL).any():
                return False
            self._evict_coldest_shard()
        return True

    def _raw_present(self, shard_id: int) -> bool:
        """Is the shard's decompressed file in the cache (streaming's own test for a usable shard)?"""
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw_info, _ = self.shards[shard_id].file_pairs[0]
        return os.path.isfile(os.path.join(stream.local, stream.split, raw_info.basename))

    def _cache_lock(self) -> FileLock:
        # Streaming creates its lock lazily, under this attribute name (a FileLock cannot be pickled).
        if not hasattr(self, "_cache_filelock"):
            self._cache_filelock = FileLock(self._cache_filelock_path)
        return self._cache_filelock

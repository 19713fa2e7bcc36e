"""The global sample order: position ``i`` of the run -> (source, sample id), from a seed.

Why our own order instead of ``StreamingDataset.__iter__``: the order is a
pure function of (prep output, mixture plan, seed) and of nothing about the
job's shape.  Data-parallel rank ``r`` of ``D`` with local batch ``B`` reads
positions ``[m*D*B + r*B, m*D*B + (r+1)*B)`` for its ``m``-th batch, so a global
batch holds the same samples whatever ``D`` is, and the loader's whole state
is one integer (the next global position).  Exact resume, resume across an
epoch boundary and resume on another DP degree all reduce to "continue at
position P".  MosaicML streaming still does the I/O (see ``shard_store.py``).

Construction (all seeds are ``numpy`` ``SeedSequence`` lists, so the order is
the same on every machine):

* **Mixture windows.**  An epoch of ``E`` positions is cut into windows of
  about ``W``.  Before window ``w`` source ``s`` has made
  ``round(w * W * per_epoch_s / E)`` draws, a closed form: every window
  boundary meets each source's share within half a sample of the nominal
  boundary (within ``1 + #sources/2`` samples of the actual one), an epoch ends
  with exactly ``per_epoch`` draws per source, and any position is found
  without replaying the epoch.  The labels inside a window are shuffled
  (seed, epoch, window).
* **Passes.**  A source's ``k``-th draw is offset ``k % pool`` of pass
  ``k // pool``; every pass visits each pooled sequence exactly once, and
  passes continue across epochs, so ``repeat = 4`` means four full passes.
* **Block shuffle.**  A pass visits the pool's shards in a random order and
  shuffles samples within blocks of ``shuffle_block`` consecutive samples of
  that shard order: random enough for training, and a rank works through a
  few shards at a time, which a bounded cache needs.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np

from titan_moe.data.mixture import MixturePlan

# SeedSequence tags, so the different random choices never share a stream.
_POOL, _SPANS, _BLOCK, _WINDOW = 1, 2, 3, 4


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(list(entropy))


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class SourceOrder:
    """One source's draw sequence: draw ``k`` -> sample id within the stream."""

    def __init__(self, name: str, shard_samples: tuple[int, ...], pool: int, seed: int, block: int):
        self.name = name
        self.pool = pool
        self.seed = seed
        self.block = block
        # Seeds use the source's name, not its position, so a source's order does not
        # change when another source joins or leaves the mixture.
        self.key = zlib.crc32(name.encode())
        sizes = np.asarray(shard_samples, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        if pool < sizes.sum():
            # A fixed subset of whole shards (the last one cut), the same for every pass:
            # the unique data of a data-reuse run.
            order = _rng(seed, _POOL, self.key).permutation(len(sizes))
            lengths = sizes[order]
            keep = int(np.searchsorted(np.cumsum(lengths), pool)) + 1
            starts, sizes = starts[order[:keep]], lengths[:keep].copy()
            sizes[-1] -= int(sizes.sum()) - pool
        self.span_starts = starts
        self.span_sizes = sizes
        self._passes = _LRU(2)
        self._blocks = _LRU(8)

    def _pass(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        def make():
            perm = _rng(self.seed, _SPANS, self.key, p).permutation(len(self.span_sizes))
            ends = np.cumsum(self.span_sizes[perm])
            return perm, ends

        return self._passes.get_or(p, make)

    def _block(self, p: int, b: int) -> np.ndarray:
        def make():
            perm, ends = self._pass(p)
            pos = np.arange(b * self.block, min((b + 1) * self.block, self.pool), dtype=np.int64)
            span = np.searchsorted(ends, pos, side="right")
            begin = ends[span] - self.span_sizes[perm[span]]
            ids = self.span_starts[perm[span]] + (pos - begin)
            return ids[_rng(self.seed, _BLOCK, self.key, p, b).permutation(len(ids))]

        return self._blocks.get_or((p, b), make)

    def samples(self, draws: np.ndarray) -> np.ndarray:
        """Sample ids (within the stream) of the given draw indices."""
        p, offset = np.divmod(draws, self.pool)
        b, i = np.divmod(offset, self.block)
        out = np.empty(len(draws), dtype=np.int64)
        for key in sorted(set(zip(p.tolist(), b.tolist()))):
            mask = (p == key[0]) & (b == key[1])
            out[mask] = self._block(*key)[i[mask]]
        return out


class SampleOrder:
    """The run's global order over all sources of a :class:`MixturePlan`."""

    def __init__(self, plan: MixturePlan, shard_samples: dict[str, tuple[int, ...]], seed: int,
                 window: int, block: int):
        self.plan = plan
        self.seed = seed
        self.epoch = plan.epoch
        self.window = window
        self.per_epoch = np.array([s.per_epoch for s in plan.sources], dtype=np.int64)
        self.sources = [
            SourceOrder(s.name, shard_samples[s.name], s.pool, seed, block) for s in plan.sources
        ]
        self._per_epoch = [int(c) for c in self.per_epoch]
        self.n_windows = -(-self.epoch // window)
        self._windows = _LRU(4)

    def drawn_before(self, w: int) -> np.ndarray:
        """Draws per source in windows ``0 .. w-1`` of an epoch: ``round(x * per_epoch / E)``.

        ``x = min(w * window, E)`` is the window's nominal boundary.  Each source
        is rounded on its own, so the counts never decrease with ``w``, stay within
        half a sample of their exact share, and end at exactly ``per_epoch``; the
        price is that a window's length is ``window`` only up to
        ``#sources / 2`` samples.  Python integers: ``x * per_epoch`` can pass 2**63.
        """
        x = min(w * self.window, self.epoch)
        half = self.epoch // 2
        return np.array([(x * c + half) // self.epoch for c in self._per_epoch], dtype=np.int64)

    def _boundary(self, w: int) -> int:
        """Epoch offset where window ``w`` starts."""
        return int(self.drawn_before(w).sum())

    def _locate(self, offset: int) -> int:
        """The window holding epoch offset ``offset`` (nominal guess, then step to the real one)."""
        w = min(offset // self.window, self.n_windows - 1)
        while self._boundary(w) > offset:
            w -= 1
        while self._boundary(w + 1) <= offset:
            w += 1
        return w

    def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Source label and within-window occurrence index of every position of a window."""

        def make():
            before = self.drawn_before(w)
            counts = self.drawn_before(w + 1) - before
            labels = np.repeat(np.arange(len(counts)), counts)
            labels = labels[_rng(self.seed, _WINDOW, epoch, w).permutation(len(labels))]
            # k-th occurrence of its source within the window, for every position.
            by_source = np.argsort(labels, kind="stable")
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            occurrence = np.empty(len(labels), dtype=np.int64)
            occurrence[by_source] = np.arange(len(labels)) - first[labels[by_source]]
            return self._boundary(w), before, labels, occurrence

        return self._windows.get_or((epoch, w), make)

    def take(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample id within that source) for positions ``start .. start+count-1``."""
        source = np.empty(count, dtype=np.int64)
        draw = np.empty(count, dtype=np.int64)
        i = 0
        while i < count:
            epoch, offset = divmod(start + i, self.epoch)
            w = self._locate(offset)
            begin, before, labels, occurrence = self._window(epoch, w)
            # This window serves positions up to its end (or the epoch's), at most count - i.
            n = min(count - i, begin + len(labels) - offset)
            local = np.arange(offset - begin, offset - begin + n)
            s = labels[local]
            source[i : i + n] = s
            draw[i : i + n] = epoch * self.per_epoch[s] + before[s] + occurrence[local]
            i += n
        sample = np.empty(count, dtype=np.int64)
        for s, source_order in enumerate(self.sources):
            mask = source == s
            if mask.any():
                sample[mask] = source_order.samples(draw[mask])
        return source, sample

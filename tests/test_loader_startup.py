"""The O(shards) sample lookup and shard readers give exactly what streaming's own would."""

from __future__ import annotations

import json

import numpy as np
import pytest

from titan_moe.data.fast_streaming import ShardSpanner, _reader


def test_shard_spanner_matches_streaming_spanner():
    from streaming.base.spanner import Spanner

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 3000, size=400).astype(np.int64)
    sizes[[3, 50]] = 1  # tiny shards inside a 1024-sample span
    theirs, ours = Spanner(sizes.copy()), ShardSpanner(sizes)
    total = int(sizes.sum())
    probes = np.concatenate([rng.integers(0, total, 5000), np.cumsum(sizes)[:-1], np.cumsum(sizes)[:-1] - 1, [0, total - 1]])
    for i in probes.tolist():
        assert ours[i] == theirs[i], i
    assert ours.shards_of(probes).tolist() == [theirs[i][0] for i in probes.tolist()]
    for bad in (-1, total):
        with pytest.raises(IndexError, match="Invalid sample index"):
            ours[bad]
    # Memory: the bounds only (8 bytes per shard), never per sample.
    assert ours.shard_bounds.nbytes == 8 * (len(sizes) + 1)


def test_cheap_readers_equal_streaming_readers(tmp_path):
    from streaming import MDSWriter
    from streaming.base.format import reader_from_json

    with MDSWriter(out=str(tmp_path), columns={"tokens": "ndarray:uint16:8", "num_valid": "int32"},
                   compression="zstd", hashes=["sha1", "xxh64"], size_limit=300) as w:
        for i in range(40):
            w.write({"tokens": np.arange(8, dtype=np.uint16) + i, "num_valid": 8})
    shards = json.loads((tmp_path / "index.json").read_text())["shards"]
    assert len(shards) > 2
    for info in shards:
        stock, ours = reader_from_json(str(tmp_path), None, info), _reader(str(tmp_path), None, info)
        assert vars(ours) == vars(stock)

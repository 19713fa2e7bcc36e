"""The O(shards) sample lookup and shard readers give exactly what streaming's own would."""

from __future__ import annotations

import json
import os

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


def _count_readers(monkeypatch) -> list[int]:
    """Count MDSReader constructions (the per-shard cost the lazy shards avoid)."""
    from streaming.base.format.mds.reader import MDSReader

    built = []
    original = MDSReader.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(MDSReader, "__init__", counting)
    return built


def test_shard_readers_are_built_on_first_read_only(tmp_path, monkeypatch):
    from tests.mds_streams import sample_tokens, write_prep_output
    from titan_moe.data.manifest import read_prep_output
    from titan_moe.data.shard_store import ShardStore

    root = write_prep_output(tmp_path / "prep", {"a": 300, "b": 200}, shard_bytes=1 << 10)
    prep = read_prep_output(str(root), field="data.root", seq_len=32)
    shards = sum(len(s.shard_samples) for s in prep.streams.values())
    assert shards > 40
    built = _count_readers(monkeypatch)
    store = ShardStore(prep, ["a", "b"], str(tmp_path / "cache"))
    try:
        # One reader per stream, to check its column encodings once; none per shard.
        assert len(built) == 2
        tokens, num_valid = store.read(np.array([0, 1, 0]), np.array([0, 150, 1]))
        # Samples 0 and 1 of "a" lie in its shard 0, built already for the column check: only
        # b's shard holding sample 150 is new.  Reading it again builds nothing.
        assert len(built) == 3
        store.read(np.array([1, 0]), np.array([150, 0]))
        assert len(built) == 3
        assert tokens.tolist() == [sample_tokens(0, 0, 32).tolist(), sample_tokens(1, 150, 32).tolist(),
                                   sample_tokens(0, 1, 32).tolist()]
        assert num_valid.tolist() == [32, 32, 32]
    finally:
        store.close()


def test_lazy_shards_equal_streaming_readers(tmp_path):
    """Built lazily, a shard's reader, size and cache state are streaming's own."""
    import shutil

    from streaming import MDSWriter, Stream
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json
    from streaming.base.world import World

    from titan_moe.data.fast_streaming import LazyShard, indexed_stream_class

    remote = tmp_path / "remote"
    with MDSWriter(out=str(remote), columns={"tokens": "ndarray:uint16:8", "num_valid": "int32"},
                   compression="zstd", hashes=["sha1", "xxh64"], size_limit=300) as w:
        for i in range(60):
            w.write({"tokens": np.arange(8, dtype=np.uint16) + i, "num_valid": 8})
    infos = json.loads((remote / "index.json").read_text())["shards"]
    assert len(infos) > 4
    # Warm caches: shard 0 decompressed, shard 1 compressed only, shard 2 both, the rest absent
    # (one copy each for ours and streaming's, as setting up may evict files).
    def warm(local):
        local.mkdir()
        for k in (1, 2):
            shutil.copy(remote / infos[k]["zip_data"]["basename"], local)
        for k in (0, 2):  # what streaming leaves after decompressing
            data = (remote / infos[k]["zip_data"]["basename"]).read_bytes()
            (local / infos[k]["raw_data"]["basename"]).write_bytes(decompress(infos[k]["compression"], data))
        return str(local)

    ours_local, stock_local = warm(tmp_path / "ours"), warm(tmp_path / "stock")
    # keep_zip=False: what the shard store gets by default.
    stock_stream = Stream(remote=str(remote), local=stock_local, keep_zip=False)
    stock = [reader_from_json(stock_local, stock_stream.split, info) for info in infos]
    lazy_stream = indexed_stream_class()(remote=str(remote), local=ours_local, keep_zip=False,
                                         shard_entries=tuple(infos))
    lazy = lazy_stream.get_shards(World.detect(), False)
    assert [len(s) for s in lazy] == [len(s) for s in stock]
    assert [s.samples for s in lazy] == [s.samples for s in stock]
    assert [s.get_max_size() for s in lazy] == [s.get_max_size() for s in stock]
    assert all(s._reader is None for s in lazy[1:])  # only the first was built (to check columns)

    ours = np.zeros(len(lazy), np.int64)
    theirs = np.zeros(len(stock), np.int64)
    lazy_stream.set_up_local(lazy, ours)
    stock_stream.set_up_local(stock, theirs)
    assert ours.tolist() == theirs.tolist()
    assert [k for k, used in enumerate(ours.tolist()) if used] == [0, 1, 2]
    assert sorted(os.listdir(ours_local)) == sorted(os.listdir(stock_local))
    assert all(s._reader is None for s in lazy[3:])  # absent shards were not asked
    # Reading builds the reader once, equal to streaming's own, and decodes the same samples.
    for ours_shard, stock_shard in zip(lazy, stock):
        assert vars(ours_shard.reader) == {**vars(stock_shard), "dirname": ours_local}
        assert ours_shard.reader is ours_shard.reader
    assert lazy[0][2]["tokens"].tolist() == stock[0][2]["tokens"].tolist() == list(range(2, 10))


def test_index_entries_share_their_column_lists(tmp_path):
    from tests.mds_streams import write_prep_output
    from titan_moe.data.manifest import read_prep_output

    root = write_prep_output(tmp_path / "prep", {"a": 200}, shard_bytes=1 << 10)
    stream = read_prep_output(str(root), field="data.root", seq_len=32).streams["a"]
    entries = stream.shard_entries
    assert len(entries) == len(stream.shard_samples) > 5
    assert [e["samples"] for e in entries] == list(stream.shard_samples)
    for key in ("column_names", "column_encodings", "column_sizes", "hashes"):
        assert all(e[key] is entries[0][key] for e in entries), key
    assert entries[0]["column_names"] == ["num_valid", "tokens"]


@pytest.mark.parametrize("where, words", [
    ("index", "has MDS index version 1, expected 2"),
    ("shard", "stream 'a' shard 3 is 'mds' version 1, expected 'mds' version 2"),
])
def test_a_wrong_mds_version_is_named_before_any_shard_is_read(tmp_path, where, words):
    """Readers are built late, so the manifest check is where a bad index must fail."""
    from tests.mds_streams import write_prep_output
    from titan_moe.data.manifest import read_prep_output
    from titan_moe.common.errors import ConfigError

    root = write_prep_output(tmp_path / "prep", {"a": 200}, shard_bytes=1 << 10)
    path = root / "a" / "index.json"
    index = json.loads(path.read_text())
    if where == "index":
        index["version"] = 1
    else:
        index["shards"][3]["version"] = 1
    path.write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=words):
        read_prep_output(str(root), field="data.root", seq_len=32)

"""The loader over s3:// (moto's real S3 server on loopback), with a bounded local cache."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest

from tests.mds_streams import decode_ids, write_prep_output
from titan_moe.data.config import DataConfig
from titan_moe.data.loader import build_streaming_dataloader
from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import parse_run_config

SEQ = 32


def upload(s3, bucket: str, root: Path, prefix: str) -> str:
    client = s3.client()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def base_job(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(f'[training]\nseq_len = {SEQ}\nlocal_batch_size = 4\n[data]\nroot = "unset"\n')
    return parse_run_config(["--job.config_file", str(path)])


def job(base, root: str, cache: Path, **data):
    out = copy.deepcopy(base)
    out.data = DataConfig(root=root, local_cache=str(cache), **data)
    return out


def test_s3_reads_the_same_samples_as_local_under_a_cache_limit(base_job, s3, s3_bucket, tmp_path):
    root = write_prep_output(tmp_path / "mix", {"a": 320, "b": 160}, seq_len=SEQ, shard_bytes=1024)
    url = upload(s3, s3_bucket, root, "olmoe/32")
    shards = len(list(root.rglob("*.mds.zstd")))  # 45 shards of ~1 kB
    limit = 11 * 1024  # ~10 decompressed shards (the indexes are never copied into the cache)

    local = build_streaming_dataloader(1, 0, None, job(base_job, str(root), tmp_path / "c1", mixture_window=16, shuffle_block=40))
    expected = [(i["input"], labels) for _, (i, labels) in zip(range(130), local)]
    local.close()

    remote = build_streaming_dataloader(
        1, 0, None, job(base_job, url, tmp_path / "c2", mixture_window=16, shuffle_block=40, cache_limit=f"{limit}b")
    )
    usage = []
    for (want_inputs, want_labels), (_, (inputs, labels)) in zip(expected, zip(range(130), remote)):
        assert inputs["input"].equal(want_inputs) and labels.equal(want_labels)
        usage.append(remote.store.dataset.cache_usage)
    assert max(usage) <= limit
    resident = sum(1 for p in (tmp_path / "c2").rglob("*.mds"))
    remote.close()
    assert resident <= 12 < shards  # shards were evicted to stay under the limit...
    assert len({s for x, _ in expected for s in decode_ids(x)}) == 480  # ...after every sample was read


def test_concurrent_downloads_never_take_the_cache_over_its_limit(base_job, tmp_path, monkeypatch):
    """A full cache, then six downloads at once, each held open 200 ms: the race made certain.

    Streaming alone makes room for one shard and downloads without holding that space, so the
    other five see the same room and the cache ends ~4 shards over its limit; the store's
    dataset reserves each download's space first and evicts enough for all six.
    """
    from streaming.base.dataset import _ShardState

    root = write_prep_output(tmp_path / "mix", {"a": 320, "b": 160}, seq_len=SEQ, shard_bytes=1024)
    limit = 11 * 1024
    cache = tmp_path / "cache"
    loader = build_streaming_dataloader(1, 0, None, job(base_job, str(root), cache, cache_limit=f"{limit}b"))
    dataset = loader.store.dataset
    assert dataset.num_shards > 30  # many times what fits
    for shard in range(20):  # fill the cache to its limit, evicting as it goes
        dataset.prepare_shard(shard)
    stream_class = type(dataset.streams[0])
    download = stream_class.prepare_shard

    def slow_download(self, shard):
        time.sleep(0.2)
        return download(self, shard)

    monkeypatch.setattr(stream_class, "prepare_shard", slow_download)
    peaks = {"accounted": 0, "on_disk": 0}
    done = threading.Event()

    def on_disk() -> int:
        return sum(p.stat().st_size for p in cache.rglob("*.mds*") if p.is_file())

    def watch():
        while not done.is_set():
            peaks["on_disk"] = max(peaks["on_disk"], on_disk())
            peaks["accounted"] = max(peaks["accounted"], int(dataset.cache_usage))
            time.sleep(0.001)

    start = threading.Barrier(6)

    def fetch(shard):
        start.wait(timeout=30)
        dataset.prepare_shard(shard)

    watcher = threading.Thread(target=watch)
    watcher.start()
    fetchers = [threading.Thread(target=fetch, args=(shard,)) for shard in range(24, 30)]
    try:
        for t in fetchers:
            t.start()
        for t in fetchers:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in fetchers), "a fetch never finished"
    finally:
        done.set()
        watcher.join()
    final = {"accounted": int(dataset.cache_usage), "on_disk": on_disk()}
    loaded = [shard for shard in range(24, 30) if dataset._shard_states[shard] == _ShardState.LOCAL]
    loader.close()
    assert loaded == list(range(24, 30)), "every requested shard is in the cache"
    # What the files take at any moment, and what streaming counts (reservations included).
    assert peaks["on_disk"] <= limit and peaks["accounted"] <= limit, peaks
    assert final["on_disk"] <= final["accounted"] <= limit, final


def test_missing_s3_stream_is_named(base_job, s3, s3_bucket, tmp_path):
    root = write_prep_output(tmp_path / "mix", {"a": 5, "b": 5}, seq_len=SEQ)
    (root / "b" / "index.json").unlink()
    url = upload(s3, s3_bucket, root, "broken")
    with pytest.raises(ConfigError) as err:
        build_streaming_dataloader(1, 0, None, job(base_job, url, tmp_path / "c"))
    assert err.value.field == "data.root"
    assert f"stream 'b' is listed in the manifest but {url}/b/index.json does not exist" in str(err.value)

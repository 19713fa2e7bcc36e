"""``titan-moe prep`` against a real S3-protocol server (moto on loopback).

Input is read from a bucket and output written to one; the output must be
byte-identical to a local run, readable by MosaicML's StreamingDataset from
s3://, and survive connections dropped in the middle of uploads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep
from tests.prep_support import TOKENIZER, expected_tokens, flatten, load_tokenizer, make_corpus, read_stream
from titan_moe.common.storage import RetryPolicy, StorageError

SEQ_LEN = 64
SHARD = "2kb"
FAST_RETRY = RetryPolicy(retries=2, backoff_s=0.01)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), seed=1)


@pytest.fixture(scope="module")
def local_reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    run_prep(PrepConfig(input_root=str(corpus.root), output=str(out), tokenizer=str(TOKENIZER),
                        seq_len=SEQ_LEN, workers=1, shard_size=SHARD, progress=False))
    return out


def upload(s3, bucket: str, root: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root)}")


def assert_same_objects(s3, bucket: str, prefix: str, local: Path, sources) -> None:
    """Every object under ``prefix`` equals the local run's file, and vice versa."""
    want = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.parts[len(local.parts)] in sources}
    got = {k[len(prefix) + 1:] for k in s3.keys(bucket, prefix + "/") if k.split("/")[1] in sources}
    assert got == want
    for rel in want:
        assert s3.get(bucket, f"{prefix}/{rel}") == (local / rel).read_bytes(), rel


def test_bucket_to_bucket_with_workers_and_flaky_uploads(s3, s3_bucket, s3_fault_proxy, corpus, local_reference,
                                                         tmp_path, monkeypatch):
    upload(s3, s3_bucket, corpus.root, "in")
    # Uploads go through the proxy; one group record (shared work of a sharded
    # run) and one shard upload (in a writer thread) lose their connection once each.
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_fault_proxy.endpoint_url)
    s3_fault_proxy.cut(r"/out/_work/wiki/group\.00000\.json$", times=1)
    s3_fault_proxy.cut(r"/out/code/shard\.00000\.00001\.mds\.zstd$", times=1)
    report = run_prep(PrepConfig(
        input_root=f"s3://{s3_bucket}/in", output=f"s3://{s3_bucket}/out", tokenizer=str(TOKENIZER),
        seq_len=SEQ_LEN, workers=2, shard_size=SHARD, retry=FAST_RETRY, progress=False, sharded=True))
    assert len(s3_fault_proxy.cut_paths) == 2  # both faults happened, both were retried
    assert report.files_tokenized == sum(corpus.files.values())
    # Same bytes as the local run; no work files left in the bucket.
    assert_same_objects(s3, s3_bucket, "out", local_reference, set(corpus.kept) | {"manifest.json"})
    assert not s3.keys(s3_bucket, "out/_work")

    # MosaicML's reader, straight from the bucket, gives back every accepted token.
    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint_url)
    tokenizer = load_tokenizer()
    for source, texts in corpus.kept.items():
        samples = read_stream(f"s3://{s3_bucket}/out/{source}", tmp_path / source)
        assert np.array_equal(flatten(samples), expected_tokens(tokenizer, texts)), source


def test_dropped_connections_fail_naming_the_object_then_resume(s3, s3_bucket, s3_fault_proxy, corpus,
                                                                local_reference, capsys, monkeypatch):
    upload(s3, s3_bucket, corpus.root, "in")
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_fault_proxy.endpoint_url)
    s3_fault_proxy.cut(r"/out/wiki/shard\.00000\.00002\.mds\.zstd$", times=None)  # the store keeps failing
    args = [f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", "--tokenizer", str(TOKENIZER),
            "--seq-len", str(SEQ_LEN), "--sources", "wiki", "--workers", "1", "--shard-size", SHARD,
            "--retries", "2", "--retry-backoff", "0.01", "--no-progress"]
    assert prep_main(args) == 1
    err = capsys.readouterr().err
    assert f"could not upload s3://{s3_bucket}/out/wiki/shard.00000.00002.mds.zstd after 3 attempts (--retries 2)" in err
    assert "re-run the same command to resume" in err
    assert len(s3_fault_proxy.cut_paths) >= 3  # one per attempt (aiohttp may re-send once on a reused connection)
    # Shards before the failure are up, but no index.json points at the missing one.
    keys = s3.keys(s3_bucket, "out/wiki/")
    assert "out/wiki/shard.00000.00001.mds.zstd" in keys
    assert "out/wiki/index.json" not in keys and "out/wiki/manifest.json" not in keys
    assert "out/manifest.json" not in s3.keys(s3_bucket, "out/")

    # The store recovers: the same command resumes, reusing every tokenized file.
    s3_fault_proxy.clear()
    report = run_prep(PrepConfig(
        input_root=f"s3://{s3_bucket}/in", output=f"s3://{s3_bucket}/out", tokenizer=str(TOKENIZER),
        seq_len=SEQ_LEN, sources=("wiki",), workers=1, shard_size=SHARD, retry=FAST_RETRY, progress=False))
    assert (report.files_skipped, report.files_tokenized) == (corpus.files["wiki"], 0)
    assert_same_objects(s3, s3_bucket, "out", local_reference, {"wiki"})


def test_missing_bucket_is_a_clear_error(s3, tmp_path, corpus):
    with pytest.raises(StorageError, match=r"OUTPUT_URL: could not list s3://no-such-bucket-x1/out: "
                                           r"bucket 'no-such-bucket-x1' does not exist at http://127"):
        run_prep(PrepConfig(input_root=str(corpus.root), output="s3://no-such-bucket-x1/out",
                            tokenizer=str(TOKENIZER), seq_len=SEQ_LEN, sources=("math",), workers=1,
                            retry=FAST_RETRY, progress=False))

"""``titan-moe prep`` failure paths a user must be able to tell apart, through the CLI.

A missing bucket, denied credentials (a proxy answering S3's 403
AccessDenied) and an unreachable endpoint each exit 1 at once with their own
message, before any work; transient faults are retried (see test_prep_s3).
"""

from __future__ import annotations

import time

import pytest

from data_prep.cli import main as prep_main
from tests.prep_support import TOKENIZER, make_corpus
from tests.s3_server import free_port


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), seed=3)


def args(corpus, output: str) -> list[str]:
    return [str(corpus.root), output, "--tokenizer", str(TOKENIZER), "--seq-len", "64", "--workers", "1",
            "--sources", "math", "--retries", "3", "--retry-backoff", "0.5", "--no-progress"]


def test_missing_bucket(s3, corpus, capsys):
    assert prep_main(args(corpus, "s3://no-such-bucket-9/out")) == 1
    err = capsys.readouterr().err
    assert ("titan-moe prep: error: OUTPUT_URL: could not list s3://no-such-bucket-9/out: bucket "
            f"'no-such-bucket-9' does not exist at {s3.endpoint_url} (s3://no-such-bucket-9/out); "
            "create it or fix the URL") in err


def test_denied_credentials(s3, s3_bucket, s3_fault_proxy, corpus, capsys, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_fault_proxy.endpoint_url)
    s3_fault_proxy.deny(rf"^/{s3_bucket}")
    started = time.monotonic()
    assert prep_main(args(corpus, f"s3://{s3_bucket}/out")) == 1
    assert time.monotonic() - started < 30  # not retried: 3 retries would sleep 0.5+1+2 s per call
    err = capsys.readouterr().err
    assert (f"OUTPUT_URL: could not list s3://{s3_bucket}/out: access denied to s3://{s3_bucket}/out at "
            f"{s3_fault_proxy.endpoint_url}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") in err
    assert "does not exist" not in err
    assert len(s3_fault_proxy.denied_paths) == 1  # one request, no retries
    assert s3.keys(s3_bucket) == []


def test_unreachable_endpoint(s3, corpus, capsys, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT_URL", dead)
    assert prep_main(args(corpus, "s3://some-bucket/out")) == 1
    err = capsys.readouterr().err
    assert (f"OUTPUT_URL: could not list s3://some-bucket/out: endpoint unreachable: cannot connect to "
            f"{dead} for s3://some-bucket/out; check S3_ENDPOINT_URL and the network") in err
    assert "does not exist" not in err and "access denied" not in err


def test_denied_input_names_input_root(s3, s3_bucket, s3_fault_proxy, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_fault_proxy.endpoint_url)
    s3_fault_proxy.deny(rf"^/{s3_bucket}")
    a = args(corpus, str(tmp_path / "out"))
    a[0] = f"s3://{s3_bucket}/in"
    assert prep_main(a) == 1
    assert f"INPUT_ROOT: could not list s3://{s3_bucket}/in: access denied" in capsys.readouterr().err

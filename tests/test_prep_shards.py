"""Prep scaled out: ``--shard I/N`` processes against a loopback S3 server, then finalize.

The output must be byte-identical to a single-machine run whatever N and
``--workers``; a shard killed with SIGKILL mid-file and re-run must leave the
same output and no temp files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep
from tests.prep_support import TOKENIZER, big_corpus, make_corpus, prep_command, tree_digest
from tests.test_prep_s3 import upload

SEQ_LEN = 64
SHARD = "2kb"
GROUP = "1kb"  # every corpus file is its own group: 6 groups over 3 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), seed=2)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    run_prep(PrepConfig(input_root=str(corpus.root), output=str(out), tokenizer=str(TOKENIZER), seq_len=SEQ_LEN,
                        workers=1, shard_size=SHARD, group_size=GROUP, progress=False))
    return out


def run(cmd: list[str], env: dict | None = None) -> tuple[int, dict | None, str]:
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    summary = json.loads(proc.stdout) if proc.returncode == 0 else None
    return proc.returncode, summary, proc.stderr


@pytest.mark.slow
def test_three_shards_on_s3_then_finalize_equal_one_machine(s3, s3_bucket, corpus, reference):
    upload(s3, s3_bucket, corpus.root, "in")
    src, out = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"
    flags = ["--seq-len", str(SEQ_LEN), "--shard-size", SHARD, "--group-size", GROUP, "--retries", "2"]

    # Shard 0 alone: its groups are written, the run is not finalized, exit 0.
    rc, summary, err = run(prep_command(src, out, *flags, "--shard", "0/3", "--workers", "2"))
    assert rc == 0, err
    assert summary["finalized"] is False and summary["groups_written"] >= 1
    first = summary["groups_written"]
    assert s3.keys(s3_bucket, "out/manifest.json") == []
    # --finalize before the other shards ran: exit 3 naming what is missing.
    rc, _, err = run(prep_command(src, out, *flags, "--finalize"))
    assert rc == 3
    assert "titan-moe prep: error: cannot finalize: no shard has written code groups [" in err
    assert "run every --shard I/N process of the run first" in err

    # Shards 1 and 2 at the same time, shard 2 told its index by Kubernetes' variables.
    procs = [
        subprocess.Popen(prep_command(src, out, *flags, "--shard", "1/3", "--workers", "1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(prep_command(src, out, *flags, "--workers", "1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "3"}),
    ]
    summaries = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        summaries.append(json.loads(stdout))
    assert [s["shard"] for s in summaries] == ["1/3", "2/3"]
    assert first + sum(s["groups_written"] for s in summaries) == 6
    assert any(s["finalized"] for s in summaries)  # the last one to finish finalized by itself

    # The explicit finalize Job after that is a no-op that succeeds.
    rc, summary, err = run(prep_command(src, out, *flags, "--finalize"))
    assert rc == 0, err
    assert summary["finalized"] is True

    want = {str(p.relative_to(reference)): p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    got = {k[len("out/"):]: s3.get(s3_bucket, k) for k in s3.keys(s3_bucket, "out/")}
    assert sorted(got) == sorted(want)  # no work files, nothing missing
    assert got == want
    # Several groups per source, so group shards and tail shards both exist.
    index = json.loads(want["code/index.json"])
    names = [s["zip_data"]["basename"] for s in index["shards"]]
    assert any(n.startswith("shard.00002.") for n in names) and names[-1].startswith("shard.tail.")


@pytest.mark.slow
def test_kill_9_mid_file_then_rerun_gives_identical_output(tmp_path):
    root = big_corpus(tmp_path / "corpus", {"web": 3, "books": 1}, docs_per_file=3000)
    flags = ["--seq-len", "256", "--shard-size", "256kb", "--group-size", "1b", "--workers", "2"]
    ref = tmp_path / "ref"
    rc, _, err = run(prep_command(str(root), str(ref), *flags))
    assert rc == 0, err

    out = tmp_path / "out"
    proc = subprocess.Popen(prep_command(str(root), str(out), *flags, "--shard", "0/2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    temp = []
    while not temp and time.monotonic() < deadline:
        temp = [p for p in (out / "_work").rglob("*.tmp-*") if p.is_file() and p.stat().st_size > 0]
        time.sleep(0.01)
    assert temp, "no token file was ever being written"
    # SIGKILL the shard and its worker processes, as a lost node does.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(p.exists() for p in temp)  # the killed worker's partial file is left behind

    rc, summary, err = run(prep_command(str(root), str(out), *flags, "--shard", "0/2"))
    assert rc == 0, err
    assert summary["finalized"] is False
    rc, summary, err = run(prep_command(str(root), str(out), *flags, "--shard", "1/2"))
    assert rc == 0, err
    assert summary["finalized"] is True
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert tree_digest(out) == tree_digest(ref)
    assert not (out / "_work").exists()

"""``titan-moe prep`` end to end on local disk: content, accounting, determinism, resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep
from tests.prep_support import (
    EOS,
    PAD,
    TOKENIZER,
    expected_tokens,
    flatten,
    load_tokenizer,
    make_corpus,
    read_stream,
    tree_digest,
    verify_stream_files,
)
from titan_moe.common.errors import ConfigError

SEQ_LEN = 64
SHARD = "2kb"  # several shards per stream, so shard boundaries are exercised


def config(corpus_root: Path, out: Path, **overrides) -> PrepConfig:
    kwargs = dict(input_root=str(corpus_root), output=str(out), tokenizer=str(TOKENIZER), seq_len=SEQ_LEN,
                  workers=1, shard_size=SHARD, progress=False)
    kwargs.update(overrides)
    return PrepConfig(**kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted single-worker run: the output every other run must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    report = run_prep(config(corpus.root, out))
    return out, report


def test_every_accepted_token_in_order_with_eos(corpus, reference, tmp_path):
    out, _ = reference
    tokenizer = load_tokenizer()
    for source, texts in corpus.kept.items():
        samples = read_stream(str(out / source), tmp_path / source)
        want = expected_tokens(tokenizer, texts)
        assert np.array_equal(flatten(samples), want), source
        # Fixed-length sequences; only the last is partial, padded with PAD.
        assert len(samples) == math.ceil(len(want) / SEQ_LEN)
        for s in samples[:-1]:
            assert int(s["num_valid"]) == SEQ_LEN and s["tokens"].shape == (SEQ_LEN,)
        last = samples[-1]
        tail = len(want) - (len(samples) - 1) * SEQ_LEN
        assert int(last["num_valid"]) == tail
        assert np.all(last["tokens"][tail:] == PAD)
        assert last["tokens"].dtype == np.uint16
        # EOS separates documents: exactly one per accepted document.
        assert int((flatten(samples) == EOS).sum()) == len(texts)


def test_manifests_count_every_document(corpus, reference):
    out, _ = reference
    mixture = json.loads((out / "manifest.json").read_text())
    assert mixture["format"] == "titan-moe-mds/1"
    assert (mixture["seq_len"], mixture["eos_id"], mixture["pad_id"], mixture["dtype"]) == (SEQ_LEN, EOS, PAD, "uint16")
    tokenizer = load_tokenizer()
    totals = {s: len(expected_tokens(tokenizer, t)) for s, t in corpus.kept.items()}
    assert sorted(mixture["sources"]) == sorted(corpus.kept)
    for source, entry in mixture["sources"].items():
        assert entry["docs_read"] == corpus.docs_read[source]
        assert entry["docs_written"] == len(corpus.kept[source])
        assert entry["rejected_by_reason"] == corpus.rejected[source]
        assert entry["docs_read"] == entry["docs_written"] + entry["docs_rejected"]
        assert entry["files"] == corpus.files[source]
        assert entry["tokens"] == totals[source]
        assert entry["sequences"] == math.ceil(totals[source] / SEQ_LEN)
        assert entry["proportion"] == pytest.approx(totals[source] / sum(totals.values()))
        assert entry["shards"] == verify_stream_files(out / source) > 1
    # The per-source manifest names the file behind each rejection, with line numbers.
    wiki = json.loads((out / "wiki" / "manifest.json").read_text())
    by_file = {f["path"]: f for f in wiki["inputs"]}
    assert by_file["part-001.json.gz"]["rejected_by_reason"] == {"truncated_file": 1}
    assert by_file["part-001.json.gz"]["rejected_lines"] == {"truncated_file": [21]}
    assert "truncated" in by_file["part-001.json.gz"]["error"]
    assert by_file["part-000.json.gz"]["rejected_by_reason"]["invalid_utf8"] == 2
    assert wiki["padded_tokens"] == SEQ_LEN * wiki["sequences"] - wiki["tokens"]
    # Work files are gone once every stream is complete.
    assert not (out / "_work").exists()


def test_output_is_identical_for_any_worker_count(corpus, reference, tmp_path):
    out, _ = reference
    report = run_prep(config(corpus.root, tmp_path / "out", workers=2))
    assert report.files_tokenized == sum(corpus.files.values())
    assert tree_digest(tmp_path / "out") == tree_digest(out)


def test_interrupted_run_resumes_to_identical_output(corpus, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "out"
    seen = []

    def interrupt_after_four(f, stats, skipped):
        seen.append(f.relpath)
        if len(seen) == 4:
            raise KeyboardInterrupt  # what Ctrl-C or a preemption looks like mid-run

    with pytest.raises(KeyboardInterrupt):
        run_prep(config(corpus.root, out), on_file_done=interrupt_after_four)
    # Nothing half-written is visible: no mixture manifest, and any index.json
    # present has all its shards.
    assert not (out / "manifest.json").exists()
    for index in out.glob("*/index.json"):
        verify_stream_files(index.parent)
    report = run_prep(config(corpus.root, out))
    # The four finished files are not tokenized again: either their source was
    # already written as a stream before the interrupt, or their work is reused.
    reused = report.files_skipped + sum(corpus.files[s] for s in report.sources_skipped)
    assert reused == 4
    assert report.files_tokenized == sum(corpus.files.values()) - 4
    assert tree_digest(out) == tree_digest(ref_out)

    # A finished output re-run is a no-op that changes nothing.
    again = run_prep(config(corpus.root, out))
    assert sorted(again.sources_skipped) == sorted(corpus.kept) and again.files_tokenized == 0
    assert tree_digest(out) == tree_digest(ref_out)


def test_adding_a_source_later_updates_the_mixture(corpus, reference, tmp_path):
    out = tmp_path / "out"
    first = run_prep(config(corpus.root, out, sources=("math",)))
    assert list(first.manifest["sources"]) == ["math"]
    assert first.manifest["sources"]["math"]["proportion"] == 1.0
    second = run_prep(config(corpus.root, out, sources=("wiki", "code")))
    ref = json.loads((reference[0] / "manifest.json").read_text())
    assert second.manifest == ref  # same sources, counts and proportions as one full run


def test_rerun_with_another_seq_len_is_refused(corpus, reference):
    out, _ = reference
    with pytest.raises(ConfigError, match=r"--seq-len: .*seq_len 64, this run asks for 128"):
        run_prep(config(corpus.root, out, seq_len=128))


def test_mds_bytes_match_mosaicml_writer(tmp_path):
    """Our shard writer produces what streaming.MDSWriter produces for the same samples."""
    from streaming import MDSWriter

    from data_prep.mds import MDSShardWriter

    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 50280, SEQ_LEN, dtype=np.uint16), int(rng.integers(1, SEQ_LEN + 1)))
               for _ in range(300)]
    columns = {"tokens": f"ndarray:uint16:{SEQ_LEN}", "num_valid": "int32"}
    theirs = tmp_path / "theirs"
    with MDSWriter(out=str(theirs), columns=columns, compression="zstd", hashes=["sha1", "xxh64"],
                   size_limit=8192) as w:
        for tokens, valid in samples:
            w.write({"tokens": tokens, "num_valid": valid})
    ours = tmp_path / "ours"
    ours.mkdir()
    mine = MDSShardWriter(str(ours), columns, 8192, publish=lambda name: None)
    for tokens, valid in samples:
        mine.write({"tokens": tokens.tobytes(), "num_valid": np.int32(valid).tobytes()})
    mine.finish()

    import zstandard
    index_theirs = json.loads((theirs / "index.json").read_text())
    index_ours = json.loads((ours / "index.json").read_text())
    assert len(index_ours["shards"]) == len(index_theirs["shards"]) > 3
    for a, b in zip(index_ours["shards"], index_theirs["shards"]):
        # Identical except the compressed bytes (another zstd binding may pick other block splits).
        assert {k: v for k, v in a.items() if k != "zip_data"} == {k: v for k, v in b.items() if k != "zip_data"}
        raw_a = zstandard.ZstdDecompressor().decompress((ours / a["zip_data"]["basename"]).read_bytes())
        raw_b = zstandard.ZstdDecompressor().decompress((theirs / b["zip_data"]["basename"]).read_bytes())
        assert raw_a == raw_b


def test_cli_runs_and_reports_errors(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(corpus.root), str(out), "--tokenizer", str(TOKENIZER), "--seq-len", "128",
            "--workers", "1", "--no-progress"]
    assert prep_main([a for a in args if a != "--no-progress"] + ["--sources", "math"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["sources"]["math"]["sequences"] == json.loads((out / "math" / "manifest.json").read_text())["sequences"]
    # One progress bar per source, with document and token rates, on stderr.
    assert re.search(r"math: 100%.*docs/s, [\d,]+ tok/s", captured.err)
    assert "done: " in captured.err

    assert prep_main(args + ["--sources", "math,nope"]) == 2
    assert "--sources: unknown source(s) nope" in capsys.readouterr().err
    assert prep_main(args + ["--shard-size", "1kb"]) == 2
    assert "--shard-size: 1kb cannot hold one 128-token sequence" in capsys.readouterr().err
    assert prep_main(args[:2] + ["--tokenizer", str(tmp_path / "nope.json"), "--no-progress"]) == 2
    assert "--tokenizer:" in capsys.readouterr().err


def test_a_source_with_only_bad_records_fails_naming_it(tmp_path, capsys):
    root = tmp_path / "corpus"
    (root / "data" / "junk").mkdir(parents=True)
    (root / "data" / "junk" / "a.jsonl").write_bytes(b'{"text": ""}\nnot json\n\n{"id": 1}\n')
    (root / "data" / "good").mkdir(parents=True)
    (root / "data" / "good" / "a.jsonl").write_bytes(b'{"text": "hello world"}\n')
    out = tmp_path / "out"
    args = [str(root), str(out), "--tokenizer", str(TOKENIZER), "--seq-len", str(SEQ_LEN), "--workers", "1",
            "--no-progress"]
    assert prep_main(args) == 4
    err = capsys.readouterr().err
    assert ("titan-moe prep: error: source 'junk' yielded zero tokens (every document rejected: "
            "1 empty_text, 1 invalid_json, 1 missing_text). No index was written for it") in err
    # No empty index that stock streaming would refuse; the good source is complete and in the mixture.
    assert not (out / "junk" / "index.json").exists() and not (out / "junk" / "manifest.json").exists()
    assert list(json.loads((out / "manifest.json").read_text())["sources"]) == ["good"]

    # A whole run of nothing: non-zero, no manifest at all.
    assert prep_main([str(root), str(tmp_path / "out2")] + args[2:] + ["--sources", "junk"]) == 4
    assert "source 'junk' yielded zero tokens" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    """A tokenizer with more than 65536 ids gets a uint32 column; ids above 65535 survive."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["<unk>"], vocab["<|endoftext|>"], vocab["<|padding|>"] = 70000, 70001, 70002
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))  # passed as a directory holding tokenizer.json

    root = tmp_path / "corpus"
    (root / "data" / "big").mkdir(parents=True)
    docs = ["w69999 w1 w65536", "w0 w65535 w12345 w69000 w7"]
    (root / "data" / "big" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    report = run_prep(config(root, out, tokenizer=str(tmp_path / "tok"), seq_len=4))
    assert (report.manifest["dtype"], report.manifest["eos_id"], report.manifest["pad_id"]) == ("uint32", 70001, 70002)
    samples = read_stream(str(out / "big"), tmp_path / "cache")
    assert [s["tokens"].dtype for s in samples] == [np.dtype(np.uint32)] * 3
    want = [69999, 1, 65536, 70001, 0, 65535, 12345, 69000, 7, 70001]
    assert flatten(samples).tolist() == want
    assert samples[-1]["tokens"].tolist() == [7, 70001, 70002, 70002] and int(samples[-1]["num_valid"]) == 2

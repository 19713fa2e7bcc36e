"""The loader on what ``titan-moe prep`` really writes: the Data contract end to end.

A small OLMoE-layout corpus (tests/prep_support.py) goes through ``run_prep``
with the real OLMoE tokenizer; one natural epoch of the loader must hand the
trainer every prep sequence exactly once, equal to an independent
tokenization (documents + EOS, cut into seq_len chunks, the last one padded),
with labels per the loader's convention.
"""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep
from tests.prep_support import EOS, PAD, TOKENIZER, expected_tokens, load_tokenizer, make_corpus
from titan_moe.data.config import DataConfig
from titan_moe.data.loader import build_streaming_dataloader
from titan_moe.run_config.job_config import parse_run_config

SEQ = 64

pytestmark = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"the OLMoE tokenizer is not at {TOKENIZER}")


def test_one_epoch_is_every_prep_sequence_once(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", docs_per_file=12)
    out = tmp_path / "out"
    run_prep(PrepConfig(input_root=str(corpus.root), output=str(out), tokenizer=str(TOKENIZER), seq_len=SEQ,
                        workers=1, shard_size="2kb", progress=False))
    tokenizer = load_tokenizer()
    expected = {}
    for source, texts in corpus.kept.items():
        ids = expected_tokens(tokenizer, texts)
        n = -(-len(ids) // SEQ)
        padded = np.full(n * SEQ, PAD, dtype=np.int64)
        padded[: len(ids)] = ids
        expected[source] = (padded.reshape(n, SEQ), len(ids) - (n - 1) * SEQ)

    path = tmp_path / "run.toml"
    path.write_text(f"[training]\nseq_len = {SEQ}\nlocal_batch_size = 3\n[data]\nroot = \"{out}\"\n")
    job = parse_run_config(["--job.config_file", str(path)])
    job.data = DataConfig(root=str(out), local_cache=str(tmp_path / "cache"))
    loader = build_streaming_dataloader(1, 0, None, job)
    names = loader.source_names
    epoch = sum(len(chunks) for chunks, _ in expected.values())
    seen = []
    for _, (inputs, labels) in zip(range(-(-epoch // 3)), loader):
        for row, (s, i) in enumerate(loader.last_ids.tolist()):
            seen.append((names[s], i))
            chunks, last_valid = expected[names[s]]
            valid = last_valid if i == len(chunks) - 1 else SEQ
            assert inputs["input"][row].tolist() == chunks[i].tolist(), (names[s], i)
            assert labels[row, : valid - 1].tolist() == chunks[i][1:valid].tolist()
            assert (labels[row, valid - 1 :] == -100).all()
    loader.close()
    assert sorted(seen[:epoch]) == sorted((n, i) for n, (c, _) in expected.items() for i in range(len(c)))
    assert sorted(names) == sorted(expected) and all(len(c) > 1 for c, _ in expected.values())
    assert any(EOS in c for c, _ in expected.values())

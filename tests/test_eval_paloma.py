"""Paloma: windowing, both data forms, per-subset metrics against an independent computation."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random

import numpy as np
import pytest
import torch

from eval.scoring import model_input, rolling_windows
from tests.eval_support import (
    EOS,
    TOKENIZER_JSON,
    Reference,
    make_tiny_model,
    require_shared_data,
)

WINDOW = 16


def test_rolling_windows_match_lm_evaluation_harness_table():
    """The windows lm-evaluation-harness' own unit test lists for 34 tokens and a 10-token context."""
    windows = rolling_windows(list(range(34)), eos_id=-100, max_seq_len=10)
    got = [(model_input(w, 10), list(w.continuation)) for w in windows]
    assert got == [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40, 48])
def test_every_token_scored_exactly_once(n):
    tokens = list(range(1000, 1000 + n))
    windows = rolling_windows(tokens, eos_id=7, max_seq_len=WINDOW)
    assert [t for w in windows for t in w.continuation] == tokens
    assert len(windows) == math.ceil(n / WINDOW)
    assert model_input(windows[0], WINDOW)[0] == 7  # EOS-prefixed first window
    assert all(len(model_input(w, WINDOW)) <= WINDOW for w in windows)


def _doc_with_tokens(tok, n: int) -> str:
    """A real-text document that tokenizes to exactly n tokens."""
    words = ("The committee reviewed the annual budget and approved funding for new research "
             "laboratories, libraries, bridges, and three public parks near the old river harbour "
             "while residents debated taxes, schools, trains and the weather all evening long").split()  # fmt: skip
    text = ""
    for word in words * 4:
        candidate = f"{text} {word}" if text else word
        count = len(tok.encode(candidate))
        if count == n:
            return candidate
        if count > n:
            break
        text = candidate
    pytest.fail(f"could not build a {n}-token document")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_shared_data()
    from eval import TextTokenizer

    root = tmp_path_factory.mktemp("paloma")
    model_dir = make_tiny_model(root, "llama", max_seq_len=64)
    tok = TextTokenizer.from_file(TOKENIZER_JSON)
    long_doc = _doc_with_tokens(tok, int(2.5 * WINDOW))  # 40 tokens: 2.5 windows
    docs = {
        "c4_en": [long_doc, "A short one.", "Ünïcödé bytes — count ≠ characters."],
        "dolma_books": ["Chapter one. It was a dark night.", "The end of the book."],
    }
    # Hugging Face text layout, with one malformed line and one record without text.
    c4 = root / "text" / "c4_en" / "val"
    c4.mkdir(parents=True)
    lines = [json.dumps({"text": t, "id": f"c4-{i}"}) for i, t in enumerate(docs["c4_en"])]
    lines.insert(1, '{"text": "broken')
    lines.insert(3, json.dumps({"id": "no-text"}))
    with gzip.open(c4 / "val_c4_en.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    dolma = root / "text" / "dolma-v1_5" / "val"
    dolma.mkdir(parents=True)
    rows = [{"text": t, "id": f"b{i}", "subdomain": "books"} for i, t in enumerate(docs["dolma_books"])]
    rows.insert(1, {"text": "wiki text that must not count", "id": "w0", "subdomain": "wiki"})
    with gzip.open(dolma / "val_books.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    # OLMo's pre-tokenized layout: raw uint16 memmap, documents end in EOS id 0, offsets in a csv.gz.
    for subset, texts in docs.items():
        folder = root / "tok" / "v3_small_gptneox20b" / subset / "val"
        folder.mkdir(parents=True)
        flat, offsets = [], []
        for i, text in enumerate(texts):
            ids = tok.encode(text) + [0]
            offsets.append((len(flat), len(flat) + len(ids), f"{subset}-{i}", "src.jsonl.gz", i))
            flat += ids
        np.array(flat, dtype=np.uint16).tofile(folder / "part-0-00000.npy")
        buf = io.StringIO()
        csv.writer(buf).writerows(offsets)
        with gzip.open(folder / "part-0-00000.csv.gz", "wt") as f:
            f.write(buf.getvalue())
    return root, model_dir, docs


def _score(root, model_dir, tasks="paloma:c4_en+dolma_books"):
    from eval import EvalSettings, load_hf_model, run_suite

    lm, tok = load_hf_model(model_dir, max_seq_len=WINDOW)
    settings = EvalSettings(tasks=tasks, data_root=str(root), batch_tokens=64)
    return run_suite(lm, tok, settings, progress=False, return_examples=True)


def _reference_logprob(ref: Reference, text: str) -> float:
    """Windows written out by hand: [EOS]+t[0:15] -> t[0:16], then t[15:31] -> t[16:32], then t[n-17:n-1] -> rest."""
    t = ref.ids(text)
    n, L = len(t), WINDOW
    total = float(ref.token_logprobs([EOS] + t[: min(n, L) - 1], t[: min(n, L)]).sum())
    start = L
    while start < n:
        end = min(n, start + L)
        total += float(ref.token_logprobs(t[end - L - 1 : end - 1], t[start:end]).sum())
        start = end
    return total


def test_text_layout_metrics_match_reference(setup):
    root, model_dir, docs = setup
    result = _score(root / "text", model_dir)
    ref = Reference(model_dir, WINDOW)
    paloma = result["tasks"]["paloma"]
    for subset, texts in docs.items():
        logprob = sum(_reference_logprob(ref, t) for t in texts)
        tokens = sum(len(ref.ids(t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        s = paloma["subsets"][subset]
        assert (s["documents"], s["tokens"], s["bytes"]) == (len(texts), tokens, n_bytes)
        assert s["ce"] == pytest.approx(-logprob / tokens, abs=1e-5)
        assert s["ppl"] == pytest.approx(math.exp(-logprob / tokens), rel=1e-5)
        assert s["bits_per_byte"] == pytest.approx(-logprob / (n_bytes * math.log(2)), abs=1e-5)
    assert paloma["macro_ce"] == pytest.approx(
        (paloma["subsets"]["c4_en"]["ce"] + paloma["subsets"]["dolma_books"]["ce"]) / 2, rel=1e-12
    )
    # The 2.5-window document alone: all 40 tokens scored, each once.
    long_doc = next(e for e in result["examples"] if e["id"] == "c4-0")
    assert long_doc["tokens"] == 40
    assert long_doc["logprob"] == pytest.approx(_reference_logprob(ref, docs["c4_en"][0]), abs=1e-5)
    # Bad lines are skipped, counted and located.
    c4 = paloma["subsets"]["c4_en"]
    assert c4["skipped"] == 2 and paloma["skipped"] == 2
    where = [(s["location"].rsplit(":", 1)[-1], s["reason"]) for s in c4["skipped_examples"]]
    assert where[0][0] == "2" and "malformed JSON" in where[0][1]
    assert where[1] == ("4", "text: missing")


def test_pretokenized_layout_scores_the_same_tokens(setup):
    """EOS 0 separators are cut with the sidecar, never scored; results equal the text form."""
    root, model_dir, _ = setup
    text = _score(root / "text", model_dir)["tasks"]["paloma"]["subsets"]
    tokd = _score(root / "tok", model_dir)["tasks"]["paloma"]["subsets"]
    for subset in text:
        for key in ("documents", "tokens", "bytes"):
            assert tokd[subset][key] == text[subset][key]
        assert tokd[subset]["ce"] == pytest.approx(text[subset]["ce"], abs=1e-6)
        assert tokd[subset]["skipped"] == 0


def test_subset_missing_from_text_release_is_explained(setup):
    from titan_moe.common.errors import ConfigError

    root, model_dir, _ = setup
    with pytest.raises(ConfigError, match="ice is not in the Hugging Face text release"):
        _score(root / "text", model_dir, tasks="paloma:ice")


def _copy_tokenized(src, dst, *, sidecar: bool, dtype: str = "uint16", metadata: bool = False):
    """The pre-tokenized tree again, optionally without .csv.gz sidecars and/or as another dtype."""
    for npy in sorted(src.rglob("*.npy")):
        out = dst / npy.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.fromfile(npy, dtype=np.uint16).astype(dtype).tofile(out)
        if sidecar:
            name = npy.name[: -len(".npy")] + ".csv.gz"
            (out.parent / name).write_bytes((npy.parent / name).read_bytes())
        if metadata:
            (out.parent / "metadata.json").write_text(json.dumps({"dtype": dtype}))
    return dst


def _scores(root, model_dir, **cfg):
    from eval import EvalSettings, load_hf_model, run_suite

    lm, tok = load_hf_model(model_dir, max_seq_len=WINDOW)
    settings = EvalSettings(tasks="paloma:c4_en+dolma_books", data_root=str(root), batch_tokens=64, **cfg)
    return run_suite(lm, tok, settings, progress=False)["tasks"]["paloma"]["subsets"]


def test_npy_without_sidecar_splits_on_eos_zero(setup, tmp_path):
    """No .csv.gz: documents end at each EOS id 0 (OLMo's v3_small files), the same documents as with offsets."""
    from eval.tasks.paloma import SPLIT_BY_EOS, SPLIT_BY_SIDECAR

    root, model_dir, docs = setup
    bare = _copy_tokenized(root / "tok", tmp_path / "bare", sidecar=False)
    with_offsets = _scores(root / "tok", model_dir)
    split_on_eos = _scores(bare, model_dir)
    for subset, texts in docs.items():
        a, b = with_offsets[subset], split_on_eos[subset]
        assert (b["documents"], b["tokens"], b["bytes"]) == (a["documents"], a["tokens"], a["bytes"])
        assert b["documents"] == len(texts)
        assert b["ce"] == a["ce"]  # the very same token lists, scored in the very same batches
        assert (a["document_split"], b["document_split"]) == (SPLIT_BY_SIDECAR, SPLIT_BY_EOS)
        assert b["document_split"] == "EOS id 0 (OLMo v3_small convention; no .csv.gz sidecar)"


def test_uint32_token_files_by_sidecar_or_option(setup, tmp_path):
    from titan_moe.common.errors import ConfigError

    root, model_dir, _ = setup
    expected = _scores(root / "tok", model_dir)
    declared = _copy_tokenized(root / "tok", tmp_path / "declared", sidecar=True, dtype="uint32", metadata=True)
    undeclared = _copy_tokenized(root / "tok", tmp_path / "undeclared", sidecar=True, dtype="uint32")
    for got in (_scores(declared, model_dir), _scores(undeclared, model_dir, paloma_dtype="uint32")):
        for subset, want in expected.items():
            assert {k: got[subset][k] for k in ("documents", "tokens", "bytes", "ce")} == {
                k: want[k] for k in ("documents", "tokens", "bytes", "ce")
            }
    # A sidecar outranks the option; an impossible dtype is named with the file.
    assert _scores(declared, model_dir, paloma_dtype="uint16")["c4_en"]["ce"] == expected["c4_en"]["ce"]
    odd = _copy_tokenized(root / "tok", tmp_path / "odd", sidecar=True, dtype="uint16")
    npy = next(odd.rglob("c4_en/val/*.npy"))
    npy.write_bytes(npy.read_bytes() + b"\0")  # one stray byte: no longer whole uint32 tokens
    with pytest.raises(ConfigError, match=r"bytes is not a whole number of uint32 tokens \(--paloma-dtype\)"):
        _scores(odd, model_dir, paloma_dtype="uint32")


@pytest.mark.parametrize("block_elements", [1 << 22, 3 * 97])  # one block per batch; 3-position blocks
def test_windows_and_answers_score_as_one_row_at_a_time(monkeypatch, block_elements):
    """Long runs read as views, short ones gathered, blocks split anywhere: the sums of a plain per-row log-softmax."""
    import torch.nn.functional as F

    from eval import scoring
    from eval.scoring import Request, score_requests

    monkeypatch.setattr(scoring, "CE_BLOCK_ELEMENTS", block_elements)
    V, L = 97, 12
    weight = torch.randn(V, V, generator=torch.Generator().manual_seed(0))

    class Model:  # logits depend on the token and its position: any misaligned row or position shows
        max_seq_len, eos_id, name, step, device = L, 0, "fake", None, "cpu"

        def __call__(self, tokens):
            return weight[tokens] + torch.arange(tokens.shape[1])[:, None] * 0.01

    rng = random.Random(1)
    doc = [rng.randrange(1, V) for _ in range(40)]
    requests = rolling_windows(doc, 0, L)  # full windows, then a short final one
    requests += [Request(tuple(rng.randrange(1, V) for _ in range(rng.randrange(1, 9))),
                         tuple(rng.randrange(1, V) for _ in range(rng.randrange(1, 3)))) for _ in range(9)]
    got = score_requests(Model(), requests, batch_tokens=4 * L, max_batch_size=4, progress=False)
    for req, value in zip(requests, got):
        x = scoring.model_input(req, L)
        lp = F.log_softmax(Model()(torch.tensor([x]))[0].double(), -1)
        n = len(req.continuation)
        want = sum(float(lp[len(x) - n + j, t]) for j, t in enumerate(req.continuation))
        assert value == pytest.approx(want, rel=1e-5, abs=1e-5)


def _split_and_full(kind: str, tmp_path):
    """The same model twice: as eval loads it (output layer split off) and as a plain logits callable."""
    from eval.models import ModuleLogitsModel, _plain_output_head

    if kind == "titan":
        from tests.model_configs import HETEROGENEOUS, model_args
        from titan_moe.model import Transformer

        torch.manual_seed(0)
        module = Transformer(model_args(HETEROGENEOUS, seq_len=WINDOW)).eval()
        module.init_weights()
    else:
        require_shared_data()
        import transformers

        module = transformers.AutoModelForCausalLM.from_pretrained(str(make_tiny_model(tmp_path, kind, WINDOW))).eval()
    lm = ModuleLogitsModel(module, max_seq_len=WINDOW, eos_id=0)
    expect_split = kind != "gpt_neox"  # GPT-NeoX is not on the plain-head list: it keeps full logits
    assert (_plain_output_head(module) is not None) is expect_split

    class FullLogits:  # no final_hidden: the scorer must take the model's whole output
        max_seq_len, eos_id, name, step, device = WINDOW, 0, "full", None, "cpu"

        def __call__(self, tokens):
            return lm(tokens)

    return lm, FullLogits(), module.config.vocab_size if kind != "titan" else module.args.vocab_size


@pytest.mark.parametrize("kind", ["titan", "llama", "gpt_neox"])
@pytest.mark.parametrize("block_elements", [1 << 22, 5 * 300])  # one block per batch; 5-position blocks
def test_scores_from_the_split_output_layer_equal_full_logits(kind, block_elements, monkeypatch, tmp_path):
    """Paloma windows and short answers: applying the output layer only where scored changes nothing."""
    from eval import scoring
    from eval.scoring import Request, score_requests

    monkeypatch.setattr(scoring, "CE_BLOCK_ELEMENTS", block_elements)
    split, full, vocab = _split_and_full(kind, tmp_path)
    vocab = min(vocab, 300)
    rng = random.Random(2)
    requests = [w for n in (5, 16, 37, 70) for w in rolling_windows([rng.randrange(1, vocab) for _ in range(n)], 0, WINDOW)]
    requests += [Request(tuple(rng.randrange(1, vocab) for _ in range(rng.randrange(1, 12))),
                         tuple(rng.randrange(1, vocab) for _ in range(rng.randrange(1, 4)))) for _ in range(12)]
    kwargs = dict(batch_tokens=3 * WINDOW, max_batch_size=3, progress=False)
    got = score_requests(split, requests, **kwargs)
    want = score_requests(full, requests, **kwargs)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)

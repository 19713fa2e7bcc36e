"""The demo's own pieces, fast: the synthetic corpus and tokenizer, the held-out
files eval reads, the budget arithmetic that gives exactly --steps, and the
train.log parsing behind the progress bar.  The whole demo runs in
tests/test_demo_e2e.py (slow)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from jobs import demo, demo_progress
from jobs import synthetic_corpus as corpus


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus.write_corpus(root, docs_per_weight=40)
    tokenizer = corpus.train_tokenizer(root, root / "tok" / "tokenizer.json", vocab_size=600)
    return root, tokenizer


def test_corpus_texts_skip_exactly_the_planted_lines(small_corpus):
    root, _ = small_corpus
    texts = list(corpus.corpus_texts(root))
    expected = sum((40 * weight) // 2 * 2 for _, weight in corpus.SOURCES.values())
    assert len(texts) == expected == 400
    # dclm lives in zstd files: its documents must be among the texts (the tokenizer used to miss them).
    assert sum("visited the" in t or "opens at" in t or "best place" in t or "short story" in t for t in texts) > 100


def test_tokenizer_is_trained_on_every_source(small_corpus):
    from tokenizers import Tokenizer

    root, path = small_corpus
    tok = Tokenizer.from_file(str(path))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|padding|>") == 1
    # Words that occur only in dclm's templates compress to few tokens: BPE saw them.
    for word in (" visited", " morning", " story"):
        assert len(tok.encode(word).ids) <= 2, word


def test_heldout_files_read_back_through_eval(tmp_path):
    from eval.tasks.paloma import load_subset
    from eval.tokenizer import TextTokenizer
    from jobs.synthetic_corpus import train_tokenizer, write_corpus

    write_corpus(tmp_path / "c", docs_per_weight=20)
    tok = TextTokenizer.load(str(train_tokenizer(tmp_path / "c", tmp_path / "t.json", vocab_size=400)), eos_id=0)
    counts = corpus.write_heldout_paloma(tmp_path / "h", n=7)
    assert counts == {subset: 7 for subset in corpus.PALOMA_STANDINS.values()}
    heldout = corpus.heldout_documents(7)
    for source, subset in corpus.PALOMA_STANDINS.items():
        docs, report = load_subset(subset, tmp_path / "h", tok)
        assert [d.id for d in docs] == [f"synthetic-{source}-{i}" for i in range(7)]
        assert [tok.decode(d.tokens) for d in docs] == heldout[source]
        assert report.skipped == []  # nothing malformed
    assert "NOT Paloma" in (tmp_path / "h" / "README.txt").read_text()
    first = (tmp_path / "h" / "c4_en" / "val" / corpus.HELDOUT_FILE).read_bytes()
    corpus.write_heldout_paloma(tmp_path / "h", n=7)  # deterministic bytes: re-runs change nothing
    assert (tmp_path / "h" / "c4_en" / "val" / corpus.HELDOUT_FILE).read_bytes() == first
    with gzip.open(tmp_path / "h" / "dolma-v1_5" / "val" / corpus.HELDOUT_FILE, "rt") as f:
        subdomains = {json.loads(line)["subdomain"] for line in f}
    assert subdomains == {"stack_uniform", "pes2o", "wiki"}


@pytest.mark.parametrize("steps", [1, 7, 150, 1000])
def test_budget_override_plans_exactly_the_requested_steps(tmp_path, steps):
    from jobs.sweep.plan import build_plan
    from jobs.sweep.spec_file import load_spec

    paths = demo.DemoPaths(tmp_path, steps)
    overrides = demo.sweep_overrides(paths, vocab_size=985, steps=steps)
    plan = build_plan(load_spec(demo.MINI_SPEC, overrides), paths.sweep)
    assert [p.row["steps"] for p in plan.points] == [steps] * 4
    assert [p.row["kind"] for p in plan.points] == ["dense", "moe", "moe", "moe"]
    dense = plan.points[0].config
    assert dense["arch"]["vocab_size"] == 985
    assert dense["training"]["dataset"] == "mds"
    assert dense["data"]["root"] == str(paths.store.resolve())
    assert [p.config["parallelism"]["expert_parallel_degree"] for p in plan.points] == [1, 2, 2, 2]


def test_last_logged_step_reads_torchtitan_lines_with_colours(tmp_path):
    log = tmp_path / "train.log"
    assert demo_progress.last_logged_step(log) is None  # not written yet
    lines = [
        "=== 2026-01-01 $ python -m titan_moe.cli train config.toml",
        "[titan] - root - INFO - \x1b[31mstep: 12  \x1b[32mloss:  4.97484  \x1b[38;2;180;60;0mgrad_norm:  0.9220",
        "[titan] - root - INFO - step: 12  lm:  4.96000  aux: 0.01  z: 0.007",
        "[titan] - root - INFO - \x1b[31mstep: 13  \x1b[32mloss:  4.51000  \x1b[38;2;180;60;0mgrad_norm:  0.9",
        "[titan] - root - INFO - step: 13  lm:  4.50000  aux: 0.01  z: 0.007",
        "[titan] - root - INFO - Saving the checkpoint",
    ]
    log.write_text("\n".join(lines) + "\n")
    assert demo_progress.last_logged_step(log) == (13, 4.51)
    log.write_text("x" * 40000 + "\n" + lines[1] + "\n")  # only the tail is read
    step, loss = demo_progress.last_logged_step(log)
    assert step == 12 and math.isclose(loss, 4.97484)


def test_bad_arguments_name_the_flag(capsys):
    assert demo.main(["--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert demo.main(["--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert "--nproc" in err and "multiple of the expert-parallel degree 2" in err


def test_demo_figures_name_their_metric_and_the_reading_matches_the_held_out_set(tmp_path, monkeypatch):
    """The demo has no validation set and its held-out text is synthetic: its main figures are the
    training loss (not plot's default, which would call the synthetic CE "Paloma"), and the held-out
    CE the closing reading compares has its own folder."""
    from jobs import demo_reading
    from jobs.sweep import collect
    from tests.test_sweep_figures import dense_row, moe_row, write_table

    paths = demo.DemoPaths(tmp_path / "demo", 7)
    rows = [dense_row("mini", train_loss=5.0, paloma_macro_ce=5.5)] + [
        moe_row("mini", g, 4, train_loss=5.0 + i / 10, paloma_macro_ce=5.6 + i / 10) for i, g in enumerate(("1", "1/2"))]
    paths.sweep.parent.mkdir(parents=True)
    Path(write_table(tmp_path, rows)).rename(paths.sweep)  # index.csv + results.csv, as collect leaves them
    monkeypatch.setattr(collect, "write_results", lambda sweep: (None, None, rows))
    monkeypatch.setattr(demo, "training_curves", lambda *a: None)  # no training logs here
    _, figures = demo.collect_and_plot(paths, [])
    main = sorted((paths.sweep / "plots").glob("*.json"))
    heldout = sorted((paths.sweep / "plots" / "synthetic_heldout_ce").glob("*.json"))
    assert main and heldout and len(figures) == len(main) + len(heldout)
    assert {json.loads(p.read_text())["metric"] for p in main} == {"train_loss"}
    assert {json.loads(p.read_text())["metric"] for p in heldout} == {"paloma_macro_ce"}
    # the reading compares the held-out CE (every point has it): dense 5.5 vs the best MoE 5.6
    reading = demo_reading.read_against_paper(rows)
    assert "held-out macro CE" in reading and "**Dense wins**" in reading and "0.1000 behind" in reading

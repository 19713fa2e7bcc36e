"""The real BoolQ and MMLU copies load whole and score end to end."""

from __future__ import annotations

import json

import pytest

from eval.tasks.boolq import BoolQ
from eval.tasks.mmlu import CATEGORIES, MMLU
from tests.eval_support import (
    EVAL_DATA,
    Reference,
    make_tiny_model,
    require_shared_data,
)

# Counted with `datasets.load_from_disk` over the 57 subjects (1531 questions in all).
MMLU_VALIDATION = {"stem": 321, "humanities": 518, "social_sciences": 337, "other": 355}


def test_boolq_validation_loads_whole():
    require_shared_data()
    data = BoolQ().load(None, data_root=EVAL_DATA)
    assert len(data.questions) == 3270 and data.report.skipped == []
    first = data.questions[0]
    assert first.prompt.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert (first.choices, first.gold) == ([" yes", " no"], 1)
    assert sum(q.gold == 0 for q in data.questions) == 2033  # BoolQ validation is 62.2% "yes"


def test_mmlu_validation_and_dev_load_whole():
    require_shared_data()
    task = MMLU()
    counts = {c: 0 for c in CATEGORIES}
    for subject in task.groups(None):
        data = task.load(subject, data_root=EVAL_DATA, need_shots=True)
        assert data.report.skipped == [] and len(data.shots) == 5 and not data.shots_from_eval_split
        assert all(q.group == subject for q in data.questions)
        counts[next(c for c, s in CATEGORIES.items() if subject in s)] += len(data.questions)
    assert counts == MMLU_VALIDATION


@pytest.mark.slow
def test_cli_scores_full_boolq_and_mmlu(tmp_path):
    """Every BoolQ and MMLU validation question through the CLI with a tiny random model."""
    from eval.cli import main

    require_shared_data()
    model_dir = make_tiny_model(tmp_path, max_seq_len=64)
    out = tmp_path / "results.json"
    rc = main(["--hf-model", str(model_dir), "--tasks", "legacy_boolq,legacy_mmlu", "--data-root", str(EVAL_DATA),
               "--shots", "0", "--out", str(out), "--no-progress", "--batch-tokens", "2048"])  # fmt: skip
    assert rc == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["legacy_boolq"]["n"] == 3270 and tasks["legacy_boolq"]["skipped"] == 0
    # Answers longer than the 64-token context cannot be scored: skipped, counted, not lost.
    tok = Reference(model_dir, 64).tok
    too_long = sum(
        any(len(tok(c, add_special_tokens=False)["input_ids"]) > 64 for c in q.choices)  # c has its leading space
        for subject in MMLU().groups(None)
        for q in MMLU().load(subject, data_root=EVAL_DATA).questions
    )
    assert too_long > 0
    assert (tasks["legacy_mmlu"]["n"], tasks["legacy_mmlu"]["skipped"]) == (1531 - too_long, too_long)
    assert "tokens; must be 1..64" in tasks["legacy_mmlu"]["skipped_examples"][0]["reason"]
    assert sum(v["n"] for v in tasks["legacy_mmlu"]["categories"].values()) == 1531 - too_long
    assert len(tasks["legacy_mmlu"]["subjects"]) == 57
    # A random model is near chance: these bounds fail only if scoring is broken.
    assert 0.1 < tasks["legacy_mmlu"]["accuracy"] < 0.4


def test_separate_tokenization_equals_harness_joint_split():
    """lm-evaluation-harness encodes context+continuation together and splits off the context's
    tokens; we encode them apart (REFERENCE.md).  On every MMLU validation pair and the first 300
    BoolQ questions (long passages: the whole set adds 10 s) the two agree."""
    from eval import TextTokenizer
    from tests.eval_support import TOKENIZER_JSON

    require_shared_data()
    tok = TextTokenizer.from_file(TOKENIZER_JSON)
    questions = BoolQ().load(None, data_root=EVAL_DATA, limit=300).questions
    for subject in MMLU().groups(None):
        questions += MMLU().load(subject, data_root=EVAL_DATA).questions
    pairs = [(q.prompt, c) for q in questions for c in q.choices]
    contexts = tok.encode_batch([p for p, _ in pairs])
    joint = tok.encode_batch([p + c for p, c in pairs])
    conts = tok.encode_batch([c for _, c in pairs])
    differ = [i for i, (ctx, whole, cont) in enumerate(zip(contexts, joint, conts)) if whole != ctx + cont]
    assert len(pairs) == 300 * 2 + 1531 * 4 and differ == []

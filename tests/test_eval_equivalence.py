"""Per-example log-likelihoods and task metrics equal an independent transformers computation.

Real data (first BoolQ validation questions, two MMLU subjects) scored by the
batched, padded, length-sorted scorer must match scoring every continuation
alone with transformers, and the metrics must match formulas applied here to
the reference numbers.
"""

from __future__ import annotations

import math

import pytest

from tests.eval_support import (
    EVAL_DATA,
    Reference,
    make_tiny_model,
    require_shared_data,
)

MAX_SEQ_LEN = 256  # shorter than many BoolQ prompts: left truncation is exercised too
ATOL = 2e-4  # float32 model; batched vs single-sequence matmuls differ in the last bits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def tiny_neox(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("neox"), "gpt_neox", MAX_SEQ_LEN)


def _ours(model_dir, tasks, **cfg):
    from eval import SuiteConfig, load_hf_model, run_suite

    lm, tok = load_hf_model(model_dir)
    config = SuiteConfig(data_root=EVAL_DATA, progress=False, return_examples=True, batch_tokens=2048, **cfg)
    return run_suite(lm, tok, tasks, config=config)


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_boolq_matches_transformers(arch, request):
    datasets = pytest.importorskip("datasets")
    tiny = request.getfixturevalue("tiny" if arch == "llama" else "tiny_neox")
    n = 20
    ours = _ours(tiny, "legacy_boolq", limit=n, shots=(0,))
    ref = Reference(tiny, MAX_SEQ_LEN)
    rows = datasets.load_from_disk(str(EVAL_DATA / "boolq" / "none" / "validation")).select(range(n))
    got = [e for e in ours["examples"] if e["task"] == "legacy_boolq"]
    assert len(got) == n
    acc, acc_char, ce = 0, 0, 0.0
    for row, example in zip(rows, got):
        prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        lls = [ref.loglik(prompt, " yes"), ref.loglik(prompt, " no")]
        gold = 0 if row["answer"] else 1
        assert example["gold"] == gold
        assert example["lls"] == pytest.approx(lls, abs=ATOL)
        acc += _argmax(lls) == gold
        acc_char += _argmax([lls[0] / 4, lls[1] / 3]) == gold  # len(" yes"), len(" no")
        ce += -lls[gold] / (3 if gold == 0 else 2)  # len("yes"), len("no")
    result = ours["tasks"]["legacy_boolq"]
    assert result["n"] == n
    assert result["accuracy"] == acc / n
    assert result["accuracy_per_char"] == acc_char / n
    assert result["ce_per_char"] == pytest.approx(ce / n, abs=ATOL)


def test_mmlu_zero_and_five_shot_match_transformers(tiny):
    datasets = pytest.importorskip("datasets")
    subjects = {"abstract_algebra": "stem", "anatomy": "other"}
    n = 5
    ours = _ours(tiny, "legacy_mmlu:abstract_algebra+anatomy", limit=n, shots=(0, 5))
    ref = Reference(tiny, MAX_SEQ_LEN)
    for shots, key in ((0, "legacy_mmlu"), (5, "legacy_mmlu_5shot")):
        got = [e for e in ours["examples"] if e["task"] == key]
        correct = {"stem": 0, "other": 0}
        ce_sum = 0.0
        for subject, category in subjects.items():
            base = EVAL_DATA / "hails" / "mmlu_no_train" / subject
            rows = datasets.load_from_disk(str(base / "validation")).select(range(n))
            dev = datasets.load_from_disk(str(base / "dev"))
            prefix = ""
            if shots:
                prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
                prefix += "".join(
                    f"Question: {d['question'].strip()}\nAnswer: {d['choices'][d['answer']]}\n\n" for d in dev.select(range(5))
                )
            mine = [e for e in got if e["group"] == subject]
            assert len(mine) == n
            for row, example in zip(rows, mine):
                prompt = prefix + f"Question: {row['question'].strip()}\nAnswer:"
                lls = [ref.loglik(prompt, " " + c) for c in row["choices"]]
                assert example["lls"] == pytest.approx(lls, abs=ATOL), (key, subject)
                correct[category] += _argmax(lls) == row["answer"]
                ce_sum += -lls[row["answer"]] / len(row["choices"][row["answer"]])
        result = ours["tasks"][key]
        assert result["n"] == 2 * n and result["num_fewshot"] == shots
        assert result["accuracy"] == (correct["stem"] + correct["other"]) / (2 * n)
        assert result["categories"]["stem"]["accuracy"] == correct["stem"] / n
        assert result["categories"]["other"]["accuracy"] == correct["other"] / n
        assert set(result["categories"]) == {"stem", "other"}
        assert result["ce_per_char"] == pytest.approx(ce_sum / (2 * n), abs=ATOL)
        assert set(result["subjects"]) == set(subjects)


def test_hellaswag_prompt_cleaning_and_scoring(tiny, tmp_path):
    """HellaSwag has no local copy: JSONL with the dataset's fields, cleaned as lm-evaluation-harness does."""
    import json

    require_shared_data()
    record = {
        "activity_label": "Making a sandwich",
        "ctx_a": "A man puts bread on a plate [header] He spreads butter.",
        "ctx_b": "then he",
        "ctx": "unused",
        "endings": ["adds ham [title] Cuts it in half.", "flies  away.", "eats the plate.", "sings"],
        "label": "0",
    }
    path = tmp_path / "hellaswag.jsonl"
    path.write_text(json.dumps(record) + "\n")
    ours = _ours(tiny, "legacy_hellaswag", shots=(0,), task_data={"hellaswag": path})
    ref = Reference(tiny, MAX_SEQ_LEN)
    # Cleaned by hand: " [title]" -> ". ", other [..] dropped, double spaces collapsed, ctx_b capitalised.
    prompt = "Making a sandwich: A man puts bread on a plate He spreads butter. Then he"
    endings = [" adds ham. Cuts it in half.", " flies away.", " eats the plate.", " sings"]
    lls = [ref.loglik(prompt, e) for e in endings]
    (example,) = ours["examples"]
    assert example["lls"] == pytest.approx(lls, abs=ATOL)
    per_char = [ll / len(e) for ll, e in zip(lls, endings)]
    result = ours["tasks"]["legacy_hellaswag"]
    assert result["accuracy_per_char"] == float(_argmax(per_char) == 0)
    assert result["ce_per_char"] == pytest.approx(-lls[0] / len(endings[0].lstrip()), abs=ATOL)
    assert math.isfinite(result["ce_per_char"])

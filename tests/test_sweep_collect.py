"""`sweep collect`: TensorBoard event files (written here with SummaryWriter), eval JSON and the index in one table."""

import csv
import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from jobs.sweep import cli
from jobs.sweep.plan import build_plan, write_plan
from tests.sweep_support import make_spec


def write_events(log_dir, scalars, start_wall=1_000_000.0):
    """scalars: {tag: {step: value}}; wall times increase from start_wall."""
    writer = SummaryWriter(str(log_dir))
    wall = start_wall
    for tag, series in scalars.items():
        for step, value in series.items():
            wall += 1.0
            writer.add_scalar(tag, value, step, walltime=wall)
    writer.close()


@pytest.fixture
def plan_dir(tmp_path):
    out = tmp_path / "plan"
    write_plan(build_plan(make_spec(tmp_path), out), out)
    return out


def test_collect_reads_losses_moe_health_and_eval(plan_dir, capsys):
    points = plan_dir / "points"
    dense = points / "tiny_dense"
    write_events(dense / "tb" / "20260101-0000", {
        "loss/lm": {s: 10.0 - 0.01 * s for s in range(1, 121)},
        "loss_metrics/global_avg_loss": {s: 99.0 for s in range(1, 121)},  # includes aux terms: not the LM loss
        "validation_metrics/loss": {50: 9.5, 100: 9.25},
    })
    (dense / ".done").write_text("{}")

    moe = points / "tiny_g1_s2"
    # A run preempted after step 80 that resumed from its step-60 checkpoint: steps 61..80 were
    # logged twice and the later (resumed) values count.
    write_events(moe / "tb" / "20260101-0000", {"loss_metrics/global_avg_loss": {s: 5.0 for s in range(1, 81)}})
    write_events(moe / "tb" / "20260101-0100", {
        "loss_metrics/global_avg_loss": {s: 4.0 for s in range(61, 101)},
        "moe/layer0.set0/load_imbalance": {s: 1.5 for s in range(61, 101)},
        "moe/layer1.set0/load_imbalance": {s: 2.5 for s in range(61, 101)},
        "moe/layer0.set0/dropped_fraction": {s: 0.1 for s in range(61, 101)},
        "moe/layer1.set0/dropped_fraction": {s: 0.3 for s in range(61, 101)},
    }, start_wall=2_000_000.0)
    write_events(moe / "tb" / "eval", {"loss/lm": {1: 100.0}})  # eval's own scalars are not training
    (moe / "eval.json").write_text(json.dumps({"format": "titan-moe-eval/1", "tasks": {
        "paloma": {"subsets": {"c4_en": {"ce": 3.0, "ppl": 20.1, "bits_per_byte": 1.1, "tokens": 10, "documents": 2},
                               "dolma_common-crawl": {"ce": 3.5, "ppl": 33.1, "bits_per_byte": 1.2, "tokens": 10,
                                                      "documents": 2}},
                   "macro_ce": 3.25, "macro_bits_per_byte": 1.15},
        "hellaswag_rc_5shot": {"library": "ai2-olmo-eval", "n": 8, "metrics": {"len_norm_v1": 0.375, "acc_v1": 0.25},
                               "olmo_core": {"hellaswag_rc_5shot (length-normalized accuracy)": 0.375}},
        "boolq": {"accuracy": 0.625, "accuracy_per_char": 0.5, "ce_per_char": 1.5, "n": 8, "num_fewshot": 0},
        "mmlu": {"accuracy": 0.3125, "accuracy_per_char": None, "ce_per_char": 2.0, "n": 16, "num_fewshot": 5,
                 "categories": {"stem": {"accuracy": 0.25, "accuracy_per_char": 0.25, "ce_per_char": 2.5, "n": 8}}}}}))
    (points / "tiny_g1-4_s2" / ".failed").write_text('{"returncode": 1}')

    assert cli.main(["collect", str(plan_dir)]) == 0
    assert "collected 3 points (2 with a training loss, 1 with Paloma)" in capsys.readouterr().out
    with open(plan_dir / "results.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}

    d = rows["tiny_dense"]
    # mean of 10 - 0.01 s over the last 50 steps, s = 71..120
    assert float(d["train_loss"]) == pytest.approx(10.0 - 0.01 * 95.5, rel=1e-6)
    assert (d["train_loss_tag"], d["train_loss_points"], d["last_step"]) == ("loss/lm", "50", "120")
    assert float(d["val_loss"]) == 9.25 and d["status"] == "done"
    assert d["moe_load_imbalance"] == ""

    m = rows["tiny_g1_s2"]
    # steps 51..60 at 5.0 (first run) and 61..100 at 4.0 (resumed run, overriding 61..80)
    assert float(m["train_loss"]) == pytest.approx((10 * 5.0 + 40 * 4.0) / 50)
    assert m["train_loss_tag"] == "loss_metrics/global_avg_loss" and m["status"] == "partial"
    assert float(m["moe_load_imbalance"]) == pytest.approx(2.0) and float(m["moe_load_imbalance_max"]) == 2.5
    assert float(m["moe_dropped_fraction"]) == pytest.approx(0.2)
    assert (float(m["paloma_macro_ce"]), float(m["boolq_accuracy"]), float(m["mmlu_accuracy"])) == (3.25, 0.625, 0.3125)
    # one column per Paloma subset (eval's subset names), per task metric and per MMLU category metric
    assert (float(m["paloma_c4_en_ce"]), float(m["paloma_dolma_common-crawl_ce"])) == (3.0, 3.5)
    assert float(m["paloma_macro_bits_per_byte"]) == 1.15
    assert (float(m["hellaswag_rc_5shot_len_norm_v1"]), float(m["hellaswag_rc_5shot_acc_v1"])) == (0.375, 0.25)
    assert (float(m["boolq_accuracy_per_char"]), float(m["boolq_ce_per_char"]), float(m["mmlu_ce_per_char"])) == (0.5, 1.5, 2.0)
    assert "mmlu_accuracy_per_char" not in m and float(m["mmlu_stem_ce_per_char"]) == 2.5  # None: no column
    assert not any(k.startswith("hellaswag_rc_5shot_olmo") or k.endswith("_n") for k in m)
    # planned knobs come along from the index
    assert (m["granularity"], m["num_experts"], m["top_k"], m["steps"]) == ("1", "2", "1", d["steps"])

    f = rows["tiny_g1-4_s2"]
    assert f["status"] == "failed" and f["train_loss"] == ""

    md = (plan_dir / "results.md").read_text()
    assert "# Sweep `t`" in md and "3 points, 1 finished, 2 with a training loss" in md
    assert "| tiny_g1_s2 | 1 | 2 | 2 | 1 | 0 | dropless | 0.01 | 0 | 0.001 | 0 |" in md
    assert "| 4.2 |" in md


def test_collect_needs_a_planned_directory(tmp_path, capsys):
    assert cli.main(["collect", str(tmp_path)]) == 2
    assert "has no index.json" in capsys.readouterr().err

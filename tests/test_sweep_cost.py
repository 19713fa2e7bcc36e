"""The cost table of `sweep plan` / `sweep cost`: GPU-hours from the planner's FLOPs, checked by hand."""

import csv

import pytest

from jobs.sweep import cli
from jobs.sweep.cost import cost_rows
from jobs.sweep.plan import build_plan
from tests.sweep_support import make_spec, spec_doc, write_spec

# tests.sweep_support.ARCH (dim 32, 2 layers, 4 heads of 8, ffn 128, vocab 300 -> 384), seq_len 16:
# dense non-embedding active params 45344 (hand count in test_sweep_plan), so per token
DENSE_FPT = 6 * 45344 + 12 * 2 * 4 * 8 * 16         # 284352
G1_S2_FPT = DENSE_FPT + 6 * 2 * 32 * 2                # + routers: 2 layers x dim 32 x 2 experts -> 285120
G4_S2_FPT = DENSE_FPT + 6 * 2 * 32 * 8                # g = 1/4: 8 experts top-4 -> 287424
TOKENS = 10 * 8 * 16                                  # budget 1280 tokens = 10 steps of 8 x 16
FLOPS = (DENSE_FPT + G1_S2_FPT + G4_S2_FPT) * TOKENS  # 1,096,826,880


def test_cost_rows_add_up_the_planners_flops_at_the_stated_mfu(tmp_path):
    spec = make_spec(tmp_path, budget={"tokens": 1280})
    rows = cost_rows(build_plan(spec, tmp_path / "plan"))
    assert [r["scale"] for r in rows] == ["tiny", "all"]
    total = rows[-1]
    assert FLOPS == 1_096_826_880
    assert (total["points"], total["dense"], total["moe"], total["tokens"]) == (3, 1, 2, 3 * TOKENS)
    assert total["train_flops"] == FLOPS
    # GPU-hours = FLOPs / (MFU 0.5 x 100 TFLOP/s) / 3600 s
    assert total["gpu_hours"] == pytest.approx(1_096_826_880 / 5e13 / 3600) == pytest.approx(6.0935e-9, rel=1e-4)


def test_plan_prints_and_writes_the_cost_table_and_mfu_flags_override_the_spec(tmp_path, capsys):
    path = write_spec(tmp_path, spec_doc(budget={"tokens": 1280}))
    out = tmp_path / "plan"
    assert cli.main(["plan", str(path), "--out", str(out), "--mfu", "0.25", "--peak-tflops", "200"]) == 0
    printed = capsys.readouterr().out
    assert "cost at MFU 0.25 of 200 TFLOP/s per GPU" in printed
    hours = FLOPS / (0.25 * 200e12) / 3600
    assert f"{hours:.4g}" in printed.splitlines()[-1] and printed.splitlines()[-1].startswith("t      all")
    with open(out / "cost.csv") as f:
        written = list(csv.DictReader(f))
    assert int(written[-1]["train_flops"]) == FLOPS and float(written[-1]["gpu_hours"]) == pytest.approx(hours)


def test_cost_lists_one_block_per_study_at_one_stated_mfu_without_writing(tmp_path, capsys):
    a = write_spec(tmp_path, spec_doc(budget={"tokens": 1280}), "a.yaml")
    b = write_spec(tmp_path, spec_doc(name="b", budget={"tokens": 2560}, cluster={"mfu": 0.9}), "b.yaml")
    base = write_spec(tmp_path, {"cluster": {"mfu": 0.5}}, "base.yaml")  # a shared base: no name
    assert cli.main(["cost", str(a), str(b), str(base)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"note: skipped {base}: a shared base for `extends` (no name), not a study"
    # the flag's default (0.35 of 989 TFLOP/s) holds for every study, whatever its spec says
    assert lines[1].startswith("cost at MFU 0.35 of 989 TFLOP/s")
    totals = {line.split()[0]: line.split() for line in lines[3:] if line.split()[1] == "all"}
    assert totals["t"][6] == f"{FLOPS:.3e}" and totals["b"][6] == f"{2 * FLOPS:.3e}"
    assert totals["b"][7] == f"{2 * FLOPS / (0.35 * 989e12) / 3600:.4g}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "b.yaml", "base.yaml"]

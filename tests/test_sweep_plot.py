"""`sweep plot`: every figure kind from a synthetic results table; absent data is skipped with a note."""

from fractions import Fraction

import pytest

from jobs.sweep import cli
from jobs.sweep.collect import result_columns
from jobs.sweep.plan import atomic_write, build_plan, csv_text
from jobs.sweep.plot import at_reference, load_results, reduce_rows, references
from tests.sweep_support import make_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FULL_MOE = {
    "granularities": ["1/4", "1/8"],
    "sparsities": [2, 4],
    "heterogeneous": [[{"granularity": "1/2", "sparsity": 2}, {"granularity": "1/8", "sparsity": 2}]],
    "generalist_granularities": ["0", "1/4"],
    "routing": [{"mode": "dropless"}, {"mode": "capacity", "capacity_factor": 1.25}],
    "aux_loss_weights": [0.01, 0.1],
    "bias_update_rates": [0.0, 0.001],
}


def synthetic_loss(row) -> float:
    """A made-up loss with a known optimum per knob (lr 1e-3 best; seeds differ by 0.01)."""
    if row["kind"] == "dense":
        return 3.5 + (0.05 if row["lr"] == 2e-3 else 0) + 0.01 * row["seed"]
    g = sum(Fraction(x) for x in row["granularity"].split("+"))
    return (3.0 + float(g) + 0.1 / row["sparsity_value"] + 0.05 * float(Fraction(row["generalist_granularity"]))
            + (0.02 if row["routing"] == "capacity" else 0) + 0.1 * row["aux_loss_weight"]
            + 10 * row["bias_update_rate"] + (0.05 if row["lr"] == 2e-3 else 0) + 0.01 * row["seed"])


def write_results(tmp_path, moe, metric="train_loss"):
    spec = make_spec(tmp_path, moe=moe, learning_rates=[1e-3, 2e-3], seeds=[0, 1])
    plan_dir = tmp_path / "plan"
    rows = [dict(p.row) for p in build_plan(spec, plan_dir).points]
    for row in rows:
        row["status"] = "done"
        row[metric] = synthetic_loss(row)
    atomic_write(plan_dir / "results.csv", csv_text(rows, result_columns(rows)))
    return plan_dir


def test_reduction_averages_seeds_takes_the_best_lr_and_holds_other_axes_at_reference(tmp_path):
    rows = load_results(write_results(tmp_path, FULL_MOE) / "results.csv")
    reduced = reduce_rows(rows, "train_loss")
    refs = references(reduced)
    assert refs == {"generalist_granularity": "0", "routing_label": "dropless", "aux_loss_weight": 0.01,
                    "bias_update_rate": 0.0, "token_multiple": 1.0}
    main = {(r["granularity"], r["sparsity"]): r for r in at_reference(reduced, refs) if not r["heterogeneous"]}
    assert sorted(main) == [("1/4", "2"), ("1/4", "4"), ("1/8", "2"), ("1/8", "4")]
    # 3 + 1/4 + 0.1/2 + 0.1*0.01 + mean over seeds 0, 1 (0.005); lr 1e-3 beats 2e-3
    assert main[("1/4", "2")]["value"] == pytest.approx(3.306)
    assert main[("1/4", "2")]["best_lr"] == 1e-3 and main[("1/4", "2")]["seeds"] == 2
    capacity = at_reference(reduced, refs, free=("routing_label",))
    assert {r["routing_label"] for r in capacity} == {"dropless", "capacity 1.25"}


def test_plot_draws_every_figure_kind_as_png_and_svg(tmp_path, capsys):
    plan_dir = write_results(tmp_path, FULL_MOE)
    assert cli.main(["plot", str(plan_dir)]) == 0
    printed = capsys.readouterr().out
    plots = plan_dir / "plots"
    expected = {"loss_vs_granularity_tiny", "loss_vs_total_experts_tiny", "dropless_vs_capacity_tiny",
                "heterogeneous_vs_homogeneous_tiny", "generalist_tiny",
                "load_balancing_tiny_g1-4_s2", "load_balancing_tiny_g1-4_s4",
                "load_balancing_tiny_g1-8_s2", "load_balancing_tiny_g1-8_s4"}
    assert {p.stem for p in plots.glob("*.png")} == expected == {p.stem for p in plots.glob("*.svg")}
    for stem in expected:
        png = (plots / f"{stem}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000, stem
        svg = (plots / f"{stem}.svg").read_text()
        assert "<svg" in svg and len(svg) > 10_000, stem
    assert f"wrote {len(expected)} figures" in printed and "note:" not in printed


def test_figures_without_data_are_skipped_with_a_note(tmp_path, capsys):
    plan_dir = write_results(tmp_path, {"granularities": ["1/4", "1/8"], "sparsities": [2]})
    assert cli.main(["plot", str(plan_dir), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out
    assert {p.stem for p in (tmp_path / "figs").glob("*.png")} == {"loss_vs_granularity_tiny", "loss_vs_total_experts_tiny"}
    for figure in ("dropless_vs_capacity", "load_balancing", "heterogeneous_vs_homogeneous", "generalist"):
        assert f"skipped {figure}" in printed

    # A table without losses (nothing trained yet) draws nothing and says why.
    assert cli.main(["plot", str(plan_dir), "--metric", "val_loss", "--out", str(tmp_path / "none")]) == 0
    assert "no point has a value for val_loss" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()
    assert cli.main(["plot", str(tmp_path)]) == 2  # no results.csv
    assert "run `titan-moe sweep collect" in capsys.readouterr().err

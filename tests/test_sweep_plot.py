"""`sweep plot`: every figure kind from a fabricated results table, checked through the figure data.

The losses are made up with a known optimum per knob, written into results.csv
the way `sweep collect` writes it, then plotted; each figure's JSON (the
plotted series) is read back and compared with hand-reduced values.
"""

import json
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
    "routing": [{"mode": "dropless"}, {"mode": "capacity", "capacity_factor": 1.0, "capacity_policy": "megablocks"}],
    "aux_loss_weights": [0.01, 0.0001],
    "bias_update_rates": [0.0, 0.001],
}


def synthetic_loss(row) -> float:
    """A made-up loss with a known optimum per knob (lr 1e-3 best; seeds differ by 0.01)."""
    lr_seed = (0.05 if row["lr"] == 2e-3 else 0) + 0.01 * row["seed"]
    if row["kind"] == "dense":
        return 3.5 - 0.25 * (row["token_multiple"] - 1) + lr_seed
    g = sum(Fraction(x) for x in row["granularity"].split("+"))
    return (3.0 + float(g) + 0.1 / row["sparsity_value"] + 0.05 * float(Fraction(row["generalist_granularity"]))
            + (0.02 if row["routing"] == "capacity" else 0) + 0.1 * row["aux_loss_weight"]
            + 10 * row["bias_update_rate"] - 0.5 * (row["token_multiple"] - 1) + lr_seed)


def synthetic_health(row) -> dict:
    """LB loss and imbalance fall with the aux weight and the bias rate; seed 1 adds 0.1 to the imbalance."""
    if row["kind"] == "dense":
        return {}
    return {"moe_aux_loss": 1.0 + 1.0 / (1 + 100 * row["aux_loss_weight"]),
            "moe_load_imbalance": 1.5 + 1.0 / (1 + 100 * row["aux_loss_weight"] + 1000 * row["bias_update_rate"])
            + 0.1 * row["seed"],
            "moe_dropped_fraction": 0.125 if row["routing"] == "capacity" else 0.0}


def write_results(tmp_path, moe, metric="train_loss", **spec_changes):
    spec = make_spec(tmp_path, moe=moe, learning_rates=[1e-3, 2e-3], seeds=[0, 1], **spec_changes)
    plan_dir = tmp_path / "plan"
    rows = [dict(p.row) for p in build_plan(spec, plan_dir).points]
    for row in rows:
        row["status"] = "done"
        row[metric] = synthetic_loss(row)
        row.update(synthetic_health(row))
    atomic_write(plan_dir / "results.csv", csv_text(rows, result_columns(rows)))
    return plan_dir


def figure(plots, stem):
    data = json.loads((plots / f"{stem}.json").read_text())
    assert data["format"] == "titan-moe-figure/1" and data["figure"] == stem and data["spec"] == "t"
    return data


def approx_series(series):
    return {label: [pytest.approx(xy) for xy in points] for label, points in series.items()}


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
    # health columns are the seed mean of the same runs: 1.5 + 1/(1+1) + 0.05
    assert main[("1/4", "2")]["moe_load_imbalance"] == pytest.approx(2.05)
    capacity = at_reference(reduced, refs, free=("routing_label",))
    assert {r["routing_label"] for r in capacity} == {"dropless", "capacity 1 megablocks"}


def test_plot_draws_every_figure_kind_with_its_series(tmp_path, capsys):
    plan_dir = write_results(tmp_path, FULL_MOE)
    assert cli.main(["plot", str(plan_dir)]) == 0
    printed = capsys.readouterr().out
    plots = plan_dir / "plots"
    expected = {"loss_vs_granularity_tiny", "loss_vs_total_experts_tiny", "dropless_vs_default_tiny",
                "heterogeneous_vs_homogeneous_tiny", "generalist_tiny",
                "load_balancing_tiny_g1-4_s2", "load_balancing_tiny_g1-4_s4",
                "load_balancing_tiny_g1-8_s2", "load_balancing_tiny_g1-8_s4"}
    for suffix in ("png", "svg", "json"):
        assert {p.stem for p in plots.glob(f"*.{suffix}")} == expected, suffix
    for stem in expected:
        assert (plots / f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE)
        svg = (plots / f"{stem}.svg").read_text()
        assert "<svg" in svg and "Spec" in svg, stem  # the caption is drawn into the figure
        assert figure(plots, stem)["caption"].count("Spec 't'") == 1
    assert f"wrote {len(expected)} figures" in printed
    assert printed.count("note:") == 1 and "skipped more_data" in printed  # one budget only

    # Fig. 2: one line per sparsity over granularity, at the reference settings, and the dense line.
    fig2 = figure(plots, "loss_vs_granularity_tiny")["panels"]
    assert len(fig2) == 1
    assert fig2[0]["series"] == approx_series({
        "sparsity 2": [[0.125, 3.0 + 0.125 + 0.05 + 0.001 + 0.005], [0.25, 3.0 + 0.25 + 0.05 + 0.001 + 0.005]],
        "sparsity 4": [[0.125, 3.0 + 0.125 + 0.025 + 0.001 + 0.005], [0.25, 3.0 + 0.25 + 0.025 + 0.001 + 0.005]],
    })
    assert fig2[0]["reference_lines"] == {"dense baseline": pytest.approx(3.505)}

    # Total experts at fixed granularity: g = 1/4 has n = 8, 16; g = 1/8 has n = 16, 32.
    experts = figure(plots, "loss_vs_total_experts_tiny")["panels"][0]["series"]
    assert {label: [x for x, _ in pts] for label, pts in experts.items()} == {
        "granularity 1/4": [8, 16], "granularity 1/8": [16, 32]}

    # Load balancing: loss, LB loss and imbalance panels, one line per aux weight over gamma.
    lb = figure(plots, "load_balancing_tiny_g1-4_s2")
    assert [p["title"] for p in lb["panels"]] == ["loss", "LB loss", "load imbalance"]
    assert "n = 8 experts" in lb["caption"]
    loss, lb_loss, imbalance = (p["series"] for p in lb["panels"])
    base = 3.0 + 0.25 + 0.05 + 0.005
    assert loss == approx_series({"aux weight α = 0.01": [[0.0, base + 0.001], [0.001, base + 0.001 + 0.01]],
                                  "aux weight α = 0.0001": [[0.0, base + 0.00001], [0.001, base + 0.00001 + 0.01]]})
    assert lb_loss == approx_series({"aux weight α = 0.01": [[0.0, 1.5], [0.001, 1.5]],
                                     "aux weight α = 0.0001": [[0.0, 1 + 1 / 1.01], [0.001, 1 + 1 / 1.01]]})
    assert imbalance["aux weight α = 0.0001"] == [pytest.approx([0.0, 1.55 + 1 / 1.01]),
                                                  pytest.approx([0.001, 1.55 + 1 / 2.01])]

    # Generalist vs none and dropless vs default: one line per setting (and sparsity).
    gen = figure(plots, "generalist_tiny")["panels"][0]["series"]
    assert sorted(gen) == ["generalist 1/4, sparsity 2", "generalist 1/4, sparsity 4",
                           "no generalist, sparsity 2", "no generalist, sparsity 4"]
    assert gen["generalist 1/4, sparsity 2"][0] == pytest.approx([0.125, 3.0 + 0.125 + 0.05 + 0.0125 + 0.001 + 0.005])
    drop = figure(plots, "dropless_vs_default_tiny")["panels"]
    assert sorted(drop[0]["series"]) == ["capacity 1 megablocks, sparsity 2", "capacity 1 megablocks, sparsity 4",
                                         "dropless, sparsity 2", "dropless, sparsity 4"]
    delta = [c[1] - d[1] for c, d in zip(drop[0]["series"]["capacity 1 megablocks, sparsity 2"],
                                         drop[0]["series"]["dropless, sparsity 2"])]
    assert delta == [pytest.approx(0.02)] * 2
    assert drop[1]["title"] == "dropped token-slots"
    assert drop[1]["series"]["capacity 1 megablocks, sparsity 4"] == [[0.125, 0.125], [0.25, 0.125]]

    # Heterogeneous (sparsity 2: 4 x 1/2 top-1 + 32 x 1/8 top-4) next to the homogeneous families.
    het = figure(plots, "heterogeneous_vs_homogeneous_tiny")["panels"][0]["series"]
    assert het["heterogeneous 1/2+1/8"] == [pytest.approx([2.0, 3.0 + 0.625 + 0.05 + 0.001 + 0.005])]
    assert [x for x, _ in het["homogeneous 1/8"]] == [2.0, 4.0]


def test_more_data_draws_one_panel_per_budget_with_its_dense_baseline(tmp_path):
    plan_dir = write_results(tmp_path, {"granularities": ["1/4", "1/8"], "sparsities": [2, 4]},
                             budget={"tokens": 1280, "multiples": [1, 4]})
    assert cli.main(["plot", str(plan_dir)]) == 0
    data = figure(plan_dir / "plots", "more_data_tiny")
    low, high = data["panels"]
    assert (low["title"], high["title"]) == ("1,280 training tokens (x1)", "5,120 training tokens (x4)")
    # dense: 3.5 - 0.25 (m - 1) + 0.005; MoE g = 1/4: 3.25 + 0.1/s + 0.001 - 0.5 (m - 1) + 0.005
    assert low["reference_lines"] == {"dense baseline": pytest.approx(3.505)}
    assert high["reference_lines"] == {"dense baseline": pytest.approx(2.755)}
    assert low["series"]["granularity 1/4"] == [pytest.approx([2.0, 3.306]), pytest.approx([4.0, 3.281])]
    assert high["series"]["granularity 1/4"] == [pytest.approx([2.0, 1.806]), pytest.approx([4.0, 1.781])]
    # the main figures stay at the first budget
    fig2 = figure(plan_dir / "plots", "loss_vs_granularity_tiny")["panels"][0]
    assert fig2["reference_lines"] == {"dense baseline": pytest.approx(3.505)}
    assert "budget x" not in data["caption"] and "budget x 1" in figure(plan_dir / "plots", "loss_vs_granularity_tiny")["caption"]


def test_figures_without_data_are_skipped_with_a_note(tmp_path, capsys):
    plan_dir = write_results(tmp_path, {"granularities": ["1/4", "1/8"], "sparsities": [2]})
    assert cli.main(["plot", str(plan_dir), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out
    assert {p.stem for p in (tmp_path / "figs").glob("*.png")} == {"loss_vs_granularity_tiny", "loss_vs_total_experts_tiny"}
    for name in ("dropless_vs_default", "load_balancing", "heterogeneous_vs_homogeneous", "generalist", "more_data"):
        assert f"skipped {name}" in printed

    # A table without losses (nothing trained yet) draws nothing and says why.
    assert cli.main(["plot", str(plan_dir), "--metric", "val_loss", "--out", str(tmp_path / "none")]) == 0
    assert "no point has a value for val_loss" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()
    assert cli.main(["plot", str(tmp_path)]) == 2  # no results.csv
    assert "run `titan-moe sweep collect" in capsys.readouterr().err

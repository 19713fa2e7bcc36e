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
from jobs.sweep.plot_data import at_reference, load_results, reduce_rows, references
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
    table = load_results(write_results(tmp_path, FULL_MOE) / "results.csv")
    assert table.metrics == ["train_loss", "moe_aux_loss", "moe_load_imbalance", "moe_dropped_fraction"]
    reduced = reduce_rows(table, "train_loss")
    refs = references(reduced, table.settings)
    assert {k: refs[k] for k in ("generalist_granularity", "routing_label", "aux_loss_weight", "bias_update_rate",
                                 "token_multiple")} == {
        "generalist_granularity": "0", "routing_label": "dropless", "aux_loss_weight": 0.01,
        "bias_update_rate": 0.0, "token_multiple": 1.0}
    # the design and what follows from it are never held fixed
    assert not {"granularity", "sparsity", "num_experts", "total_params", "steps", "lr", "seed"} & set(refs)
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
    expected = {"loss_vs_granularity_tiny", "loss_vs_granularity_fixed_n_tiny", "loss_vs_total_experts_tiny",
                "routing_tiny", "heterogeneous_tiny", "generalist_tiny", "load_balancing_tiny", "loss_vs_lr"}
    for suffix in ("png", "svg", "json"):
        assert {p.stem for p in plots.glob(f"*.{suffix}")} == expected, suffix
    for stem in expected:
        assert (plots / f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE)
        svg = (plots / f"{stem}.svg").read_text()
        assert "<svg" in svg and "Spec" in svg, stem  # the caption is drawn into the figure
        data = figure(plots, stem)
        assert data["caption"].count("Spec 't'") == 1
        # no eval results: the caption says the figure shows the training loss
        assert data["metric"] == "train_loss" and "Metric: LM loss (train CE" in data["caption"], stem
    assert f"wrote {len(expected)} figures" in printed
    assert printed.count("note:") == 2 and "skipped more_data" in printed  # one budget only
    assert "a single active scale; skipped best_granularity_vs_scale" in printed

    # Fig. 2: one line per sparsity over granularity, at the reference settings, and the dense line.
    fig2 = figure(plots, "loss_vs_granularity_tiny")["panels"]
    assert len(fig2) == 1
    assert fig2[0]["series"] == approx_series({
        "sparsity 2": [[0.125, 3.0 + 0.125 + 0.05 + 0.001 + 0.005], [0.25, 3.0 + 0.25 + 0.05 + 0.001 + 0.005]],
        "sparsity 4": [[0.125, 3.0 + 0.125 + 0.025 + 0.001 + 0.005], [0.25, 3.0 + 0.25 + 0.025 + 0.001 + 0.005]],
    })
    assert fig2[0]["reference_lines"] == {"dense baseline": pytest.approx(3.505)}
    assert fig2[0]["flagged"] == {}  # the plan has no flops_ratio_vs_dense column: nothing is marked

    # Fig. 2 left: n = 16 is g = 1/4 at s = 4 and g = 1/8 at s = 2 (k = 1/g, n = s k); n = 8, 32 have one g.
    fixed_n = figure(plots, "loss_vs_granularity_fixed_n_tiny")["panels"][0]
    assert fixed_n["series"] == approx_series({"n = 16": [[0.125, 3.0 + 0.125 + 0.05 + 0.006],
                                                         [0.25, 3.0 + 0.25 + 0.025 + 0.006]]})

    # Total experts at fixed granularity: g = 1/4 has n = 8, 16; g = 1/8 has n = 16, 32.
    experts = figure(plots, "loss_vs_total_experts_tiny")["panels"][0]["series"]
    assert {label: [x for x, _ in pts] for label, pts in experts.items()} == {
        "granularity 1/4": [8, 16], "granularity 1/8": [16, 32]}

    # Load balancing: a line per (alpha, gamma) over n; each point the mean over the designs at that n.
    lb = figure(plots, "load_balancing_tiny")
    assert [p["title"] for p in lb["panels"]] == ["loss (tiny)", "load imbalance (tiny)", "LB loss (tiny)"]
    assert "averages the designs (g, s) with that n among the 4 run under every setting" in lb["caption"]
    loss, imbalance, lb_loss = (p["series"] for p in lb["panels"])
    assert sorted(loss) == ["α = 0.0001, γ = 0", "α = 0.0001, γ = 0.001", "α = 0.01, γ = 0", "α = 0.01, γ = 0.001"]

    def design_loss(g, s, alpha, gamma):
        return 3.0 + g + 0.1 / s + 0.1 * alpha + 10 * gamma + 0.005

    assert loss["α = 0.01, γ = 0.001"] == approx_series({"l": [
        [8, design_loss(0.25, 2, 0.01, 0.001)],
        [16, (design_loss(0.25, 4, 0.01, 0.001) + design_loss(0.125, 2, 0.01, 0.001)) / 2],
        [32, design_loss(0.125, 4, 0.01, 0.001)]]})["l"]
    # imbalance 1.5 + 1 / (1 + 100 alpha + 1000 gamma) + 0.1 seed, the same at every n
    assert imbalance["α = 0.0001, γ = 0.001"] == approx_series({"l": [[n, 1.55 + 1 / 2.01] for n in (8, 16, 32)]})["l"]
    assert lb_loss["α = 0.01, γ = 0"] == approx_series({"l": [[n, 1.5] for n in (8, 16, 32)]})["l"]

    # Generalist vs none and the routing study (dropless vs dropping, with and without the bias).
    gen = figure(plots, "generalist_tiny")["panels"][0]["series"]
    assert sorted(gen) == ["generalist 1/4, sparsity 2", "generalist 1/4, sparsity 4",
                           "no generalist, sparsity 2", "no generalist, sparsity 4"]
    assert gen["generalist 1/4, sparsity 2"][0] == pytest.approx([0.125, 3.0 + 0.125 + 0.05 + 0.0125 + 0.001 + 0.005])
    route = figure(plots, "routing_tiny")["panels"]
    assert sorted(route[0]["series"]) == sorted(f"{r}, γ = {b}, sparsity {s}" for r in ("capacity 1 megablocks", "dropless")
                                                for b in ("0", "0.001") for s in (2, 4))
    delta = [c[1] - d[1] for c, d in zip(route[0]["series"]["capacity 1 megablocks, γ = 0.001, sparsity 2"],
                                         route[0]["series"]["dropless, γ = 0, sparsity 2"])]
    assert delta == [pytest.approx(0.02 + 0.01)] * 2
    assert route[1]["title"] == "dropped token-slots"
    assert route[1]["series"]["capacity 1 megablocks, γ = 0, sparsity 4"] == [[0.125, 0.125], [0.25, 0.125]]

    # Heterogeneous (sparsity 2: 4 x 1/2 top-1 + 32 x 1/8 top-4): one panel for its pair, with the
    # homogeneous designs of its granularities (1/8 ran; 1/2 did not).
    het = figure(plots, "heterogeneous_tiny")["panels"]
    assert [p["title"] for p in het] == ["g = 1/2 + 1/8 (tiny)"]
    assert sorted(het[0]["series"]) == ["heterogeneous 1/2+1/8", "homogeneous 1/8"]
    assert het[0]["series"]["heterogeneous 1/2+1/8"] == [pytest.approx([2.0, 3.0 + 0.625 + 0.05 + 0.001 + 0.005])]
    assert [x for x, _ in het[0]["series"]["homogeneous 1/8"]] == [2.0, 4.0]

    # Loss vs learning rate: seed means at each lr (2e-3 costs 0.05), a line per design plus dense.
    lr = figure(plots, "loss_vs_lr")
    assert "mean over seeds at each learning rate" in lr["caption"]
    lr_series = lr["panels"][0]["series"]
    assert len(lr_series) == 5  # dense + 4 homogeneous designs at the reference settings
    assert lr_series["dense"] == approx_series({"l": [[1e-3, 3.505], [2e-3, 3.555]]})["l"]
    assert lr_series["g 1/4, s 2"] == approx_series({"l": [[1e-3, 3.306], [2e-3, 3.356]]})["l"]


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
    assert {p.stem for p in (tmp_path / "figs").glob("*.png")} == {
        "loss_vs_granularity_tiny", "loss_vs_total_experts_tiny", "loss_vs_lr"}
    for name in ("loss_vs_granularity_fixed_n", "routing", "load_balancing", "heterogeneous", "generalist",
                 "more_data", "best_granularity_vs_scale"):
        assert f"skipped {name}" in printed

    # A metric the results do not have is an error that lists the ones they have.
    assert cli.main(["plot", str(plan_dir), "--metric", "val_loss", "--out", str(tmp_path / "none")]) == 2
    assert "unknown metric 'val_loss'; the results have: auto, train_loss" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert cli.main(["plot", str(tmp_path)]) == 2  # no results.csv
    assert "run `titan-moe sweep collect" in capsys.readouterr().err


def test_every_planned_column_is_classified_for_the_figures():
    """The figures know every index column: run identity, design, derived number, or a setting held at
    its reference (the [moe] fields, swept paths, the run's data and batch)."""
    from jobs.sweep import fields
    from jobs.sweep.plot_data import DERIVED_COLUMNS, DESIGN_COLUMNS, ROUTING_COLUMNS, RUN_COLUMNS, Table

    columns = fields.index_columns(["optimizer.weight_decay"])
    table = Table([], columns)
    settings = set(table.settings) - {"routing_label"}
    moe_knobs = set(fields.moe_columns()) - ROUTING_COLUMNS
    assert settings == moe_knobs | {"generalist_granularity", "token_multiple", "optimizer.weight_decay",
                                    "seq_len", "global_batch_size", "data_arm"}
    assert {"renormalize", "z_loss_normalization", "expert_impl"} <= settings
    assert {"tier", "name", "config"} <= RUN_COLUMNS
    assert {"spec", "dense_flops_per_token", "flops_ratio_vs_dense", "ep_degree", "train_flops"} <= DERIVED_COLUMNS
    assert not (RUN_COLUMNS | DESIGN_COLUMNS) & DERIVED_COLUMNS
    # one labelling function: the schema's, metrics included
    assert fields.axis_label("paloma_c4_en_ce") == "Paloma c4_en CE (nats/token)"
    assert fields.axis_label("bias_update_rate") == "bias update rate: Loss-free balancing step size gamma"

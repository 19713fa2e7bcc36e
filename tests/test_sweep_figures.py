"""`sweep plot` figure families and metrics from hand-written results tables.

Each table is built row by row here (index.csv + results.csv as `sweep plan` and
`sweep collect` write them, including the columns other parts of the planner add:
`tier`, `flops_ratio_vs_dense`, `data_arm`, a field swept by dotted path), so every
expected series below is computed by hand from the rows and compared with the
figure's JSON.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from jobs.sweep import cli
from jobs.sweep.plan import atomic_write, csv_text
from jobs.sweep.plot_data import load_results, reduce_rows

PLANNED = ["name", "spec", "matching", "scale", "kind", "heterogeneous", "granularity", "sparsity",
           "granularity_value", "sparsity_value", "num_experts", "top_k", "set_shares", "generalist_granularity",
           "routing", "capacity_factor", "capacity_policy", "aux_loss_weight", "bias_update_rate", "lr", "seed",
           "token_multiple", "total_params", "active_params", "flops_ratio_vs_dense", "tier", "config"]


def moe_row(scale: str, g: str, s: int, **extra) -> dict:
    gv = Fraction(g)
    k = int(1 / gv)  # FLOP matching: k g = 1
    row = {"spec": "h", "matching": "flop", "scale": scale, "kind": "moe", "heterogeneous": False, "granularity": g,
           "sparsity": str(s), "granularity_value": float(gv), "sparsity_value": float(s), "num_experts": s * k,
           "top_k": k, "generalist_granularity": "0", "routing": "dropless", "aux_loss_weight": 0.01,
           "bias_update_rate": 0.0, "lr": 1e-3, "seed": 0, "token_multiple": 1, "flops_ratio_vs_dense": 1.0, "tier": 1}
    row.update(extra)
    row["name"] = f"{scale}_g{g}_s{s}_lr{row['lr']}_seed{row['seed']}".replace("/", "-") + "".join(
        f"_{k}{v}" for k, v in extra.items() if k in ("data_arm", "optimizer_weight_decay"))
    return row


def dense_row(scale: str, **extra) -> dict:
    row = {"spec": "h", "matching": "flop", "scale": scale, "kind": "dense", "heterogeneous": False, "lr": 1e-3,
           "seed": 0, "token_multiple": 1, "flops_ratio_vs_dense": 1.0, "tier": 1}
    row.update(extra)
    row["name"] = f"{scale}_dense_lr{row['lr']}" + "".join(f"_{v}" for k, v in extra.items() if k == "data_arm")
    return row


def write_table(tmp_path, rows: list[dict], extra_planned: tuple[str, ...] = ()) -> str:
    """index.csv (the planned columns) and results.csv (planned, status, results) in a plan directory."""
    plan = tmp_path / "plan"
    plan.mkdir()
    planned = PLANNED + list(extra_planned)
    for row in rows:
        row["config"] = f"points/{row['name']}/config.toml"
    results = sorted({k for r in rows for k in r} - set(planned))
    atomic_write(plan / "index.csv", csv_text(rows, planned))
    atomic_write(plan / "results.csv", csv_text([{**r, "status": "done"} for r in rows], planned + ["status"] + results))
    return str(plan)


def figure(plan: str, stem: str, sub: str = "") -> dict:
    from pathlib import Path

    folder = Path(plan) / "plots" / sub if sub else Path(plan) / "plots"
    for suffix in ("png", "svg"):
        assert (folder / f"{stem}.{suffix}").stat().st_size > 0
    return json.loads((folder / f"{stem}.json").read_text())


def approx(series: dict) -> dict:
    return {label: [pytest.approx(list(xy)) for xy in points] for label, points in series.items()}


# ---------------------------------------------------------------------------------------- headline
ACTIVE = {"a50m": 50e6, "a150m": 150e6}
BEST_G = {"a50m": "1/4", "a150m": "1/8"}  # the optimum moves with the active scale, not with the sparsity


def headline_loss(scale: str, g: str, s: int) -> float:
    return 3.0 - 0.05 * s ** 0.5 + abs(float(Fraction(g)) - float(Fraction(BEST_G[scale])))


def total(scale: str, s: int) -> float:
    return ACTIVE[scale] * (1 + 0.5 * (s - 1))


def test_best_granularity_per_scale_default_metric_and_hollow_points(tmp_path, capsys):
    rows = []
    for scale in ACTIVE:
        rows.append(dense_row(scale, active_params=ACTIVE[scale], total_params=ACTIVE[scale],
                              paloma_macro_ce=3.2, train_loss=2.0))
        for s in (2, 8):
            for g in ("1/2", "1/4", "1/8"):
                # the finest, sparsest point of the larger scale costs 1.2x its dense model's FLOPs
                ratio = 1.2 if (scale, g, s) == ("a150m", "1/8", 8) else 1.01
                rows.append(moe_row(scale, g, s, active_params=ACTIVE[scale] + 1000, total_params=total(scale, s),
                                    flops_ratio_vs_dense=ratio, paloma_macro_ce=headline_loss(scale, g, s),
                                    train_loss=2.0 - headline_loss(scale, g, s)))  # train loss disagrees
    plan = write_table(tmp_path, rows)
    wanted = ["best_granularity_vs_scale", "loss_vs_granularity_a150m", "loss_vs_granularity_fixed_n_a50m"]
    assert cli.main(["plot", plan, *(f"--only={name}" for name in wanted)]) == 0
    assert capsys.readouterr().out.count("\n  ") == 3  # --only: just these three of the table's seven
    assert sorted(p.stem for p in (tmp_path / "plan" / "plots").glob("*.png")) == sorted(wanted)

    data = figure(plan, "best_granularity_vs_scale")
    # the default metric is the Paloma macro CE (the train loss would pick the opposite corner)
    assert data["metric"] == "paloma_macro_ce" and "Metric: Paloma macro-averaged CE" in data["caption"]
    left, right = data["panels"]
    assert left["series"] == approx({"sparsity 2": [(50e6, 0.25), (150e6, 0.125)],
                                     "sparsity 8": [(50e6, 0.25), (150e6, 0.125)]})
    assert right["series"] == approx({"a50m": [(total("a50m", 2), 0.25), (total("a50m", 8), 0.25)],
                                      "a150m": [(total("a150m", 2), 0.125), (total("a150m", 8), 0.125)]})
    assert left["annotations"] == [[50e6, 0.25, "75M-225M total"], [150e6, 0.125, "225M-675M total"]]
    # the 1.2x point is the best of its line: hollow in both panels, and the caption says why
    assert left["flagged"] == {"sparsity 8": [150e6]} and right["flagged"] == {"a150m": [total("a150m", 8)]}
    assert "Hollow markers: true FLOPs/token" in data["caption"]

    fig2 = figure(plan, "loss_vs_granularity_a150m")["panels"][0]
    assert fig2["flagged"] == {"sparsity 8": [0.125]}
    assert fig2["series"]["sparsity 8"] == approx({"l": [(g, headline_loss("a150m", f, 8)) for g, f in
                                                        ((0.125, "1/8"), (0.25, "1/4"), (0.5, "1/2"))]})["l"]
    assert fig2["reference_lines"] == {"dense baseline": 3.2}
    # n = s / g: n = 16 is (1/8, s 2) and (1/2, s 8)
    fixed_n = figure(plan, "loss_vs_granularity_fixed_n_a50m")["panels"][0]
    assert fixed_n["series"] == approx({"n = 16": [(0.125, headline_loss("a50m", "1/8", 2)),
                                                   (0.5, headline_loss("a50m", "1/2", 8))]})
    assert fixed_n["flagged"] == {}


# ---------------------------------------------------------------------------------------- metrics
def metric_rows(scales: tuple[tuple[str, float], ...] = (("tiny", 1e6),)) -> list[dict]:
    """Two granularities x two learning rates x two seeds per scale; lr 1e-3 has the better Paloma CE,
    3e-3 the better HellaSwag accuracy (so the accuracy figure shows the runs the LM metric chose);
    g = 1/4 has the better CE, g = 1/2 the better accuracy."""
    rows = []
    for scale, active in scales:
        rows.append(dense_row(scale, active_params=active, total_params=active, paloma_macro_ce=4.0,
                              paloma_c4_en_ce=4.5, hellaswag_rc_5shot_len_norm_v1=0.25))
        for g, base in (("1/2", 3.0), ("1/4", 2.9)):
            for lr, shift, acc in ((1e-3, 0.0, 0.30), (3e-3, 0.1, 0.40)):
                for seed in (0, 1):
                    rows.append(moe_row(scale, g, 2, lr=lr, seed=seed, total_params=2 * active,
                                        paloma_macro_ce=base + shift + 0.02 * seed, paloma_c4_en_ce=base + 0.5 + shift,
                                        moe_load_imbalance=1.5 + seed,
                                        hellaswag_rc_5shot_len_norm_v1=acc + (0.1 if g == "1/2" else 0) + 0.01 * seed))
    return rows


def test_metric_reduction_chooses_the_lr_on_the_lm_metric_and_errors_list_the_metrics(tmp_path, capsys):
    plan = write_table(tmp_path, metric_rows())
    table = load_results(f"{plan}/results.csv", f"{plan}/index.csv")
    assert table.metrics == ["hellaswag_rc_5shot_len_norm_v1", "moe_load_imbalance", "paloma_c4_en_ce",
                             "paloma_macro_ce"]
    assert table.eval_metrics() == ["hellaswag_rc_5shot_len_norm_v1", "paloma_c4_en_ce", "paloma_macro_ce"]
    # tier and flops_ratio_vs_dense are planned numbers, never metrics nor held-fixed settings
    assert "tier" not in table.settings and "flops_ratio_vs_dense" not in table.settings
    reduced = {r["granularity"]: r for r in reduce_rows(table, "hellaswag_rc_5shot_len_norm_v1", "paloma_macro_ce")
               if r["kind"] == "moe"}
    # lr 1e-3 (Paloma 3.01 vs 3.11 seed means) even though lr 3e-3 has the better accuracy
    assert reduced["1/2"]["best_lr"] == 1e-3 and reduced["1/2"]["value"] == pytest.approx(0.405)
    assert reduced["1/2"]["moe_load_imbalance"] == pytest.approx(2.0)
    # on its own, an accuracy picks the highest seed mean (lr 3e-3)
    alone = {r["granularity"]: r for r in reduce_rows(table, "hellaswag_rc_5shot_len_norm_v1") if r["kind"] == "moe"}
    assert alone["1/4"]["best_lr"] == 3e-3 and alone["1/4"]["value"] == pytest.approx(0.405)

    assert cli.main(["plot", plan, "--metric", "hellaswag_acc"]) == 2
    err = capsys.readouterr().err
    assert ("--metric: unknown metric 'hellaswag_acc'; the results have: auto, hellaswag_rc_5shot_len_norm_v1, "
            "moe_load_imbalance, paloma_c4_en_ce, paloma_macro_ce") in err
    assert cli.main(["plot", plan, "--all-metrics", "--metric", "paloma_macro_ce"]) == 2
    assert "--all-metrics: draws every metric; leave --metric out" in capsys.readouterr().err
    assert not (tmp_path / "plan" / "plots").exists()  # nothing half-written


def test_any_metric_and_all_metrics_write_one_figure_set_per_eval_metric(tmp_path, capsys):
    plan = write_table(tmp_path, [r for r in metric_rows((("tiny", 1e6), ("big", 4e6))) if r["lr"] == 1e-3])
    assert cli.main(["plot", plan, "--metric", "hellaswag_rc_5shot_len_norm_v1", "--only", "loss_vs_granularity_tiny",
                     "--only", "best_*"]) == 0
    capsys.readouterr()
    acc = figure(plan, "loss_vs_granularity_tiny")
    assert acc["metric_label"] == "hellaswag rc 5shot len norm v1 (higher is better)"
    assert acc["panels"][0]["title"] == "score vs granularity (tiny)"  # an accuracy is not called a loss
    assert acc["panels"][0]["series"] == approx({"sparsity 2": [(0.25, 0.305), (0.5, 0.405)]})
    assert acc["panels"][0]["reference_lines"] == {"dense baseline": 0.25}
    best = figure(plan, "best_granularity_vs_scale")["panels"][0]
    assert best["series"] == {"sparsity 2": [[1e6, 0.5], [4e6, 0.5]]}  # an accuracy: the highest wins

    assert cli.main(["plot", plan, "--all-metrics", "--only", "loss_vs_granularity_tiny"]) == 0
    printed = capsys.readouterr().out
    for metric, want in (("paloma_macro_ce", [(0.25, 2.91), (0.5, 3.01)]), ("paloma_c4_en_ce", [(0.25, 3.4), (0.5, 3.5)]),
                         ("hellaswag_rc_5shot_len_norm_v1", [(0.25, 0.305), (0.5, 0.405)])):
        data = figure(plan, "loss_vs_granularity_tiny", sub=metric)
        assert data["metric"] == metric and data["panels"][0]["series"] == approx({"sparsity 2": want})
        assert f"  {metric}/loss_vs_granularity_tiny" in printed
    c4 = figure(plan, "loss_vs_granularity_tiny", sub="paloma_c4_en_ce")
    assert "Metric: Paloma c4_en CE (nats/token)" in c4["caption"]
    assert not (tmp_path / "plan" / "plots" / "moe_load_imbalance").exists()  # training health: only by --metric


# ---------------------------------------------------------------------------------------- equal resources, swept fields
def test_equal_resources_draws_both_data_arms_against_their_dense_lines(tmp_path, capsys):
    def loss(arm: str, s: int) -> float:
        return 3.0 + 0.1 * s + (0.0 if arm == "fresh" else 0.05 * s)

    rows = [dense_row("s2b", data_arm=arm, val_loss=3.3 if arm == "reuse" else 3.25) for arm in ("reuse", "fresh")]
    rows += [moe_row("s2b", "1/8", s, matching="equal_resources", data_arm=arm, val_loss=loss(arm, s))
             for arm in ("reuse", "fresh") for s in (2, 4, 8)]
    for r in rows:
        r["matching"] = "equal_resources"
    plan = write_table(tmp_path, rows, extra_planned=("data_arm",))
    assert cli.main(["plot", plan, "--only", "equal_resources_*", "--only", "loss_vs_granularity_s2b"]) == 0
    capsys.readouterr()
    data = figure(plan, "equal_resources_s2b")
    assert data["metric"] == "val_loss" and "Metric: validation loss (token-weighted CE)" in data["caption"]
    (p,) = data["panels"]
    # n = 8 experts of g = 1/8; k = n / s -> k/n = 1/s
    assert p["series"] == approx({"reuse, g = 1/8": [(0.125, loss("reuse", 8)), (0.25, loss("reuse", 4)),
                                                    (0.5, loss("reuse", 2))],
                                  "fresh, g = 1/8": [(0.125, loss("fresh", 8)), (0.25, loss("fresh", 4)),
                                                    (0.5, loss("fresh", 2))]})
    assert p["reference_lines"] == {"dense (reuse data)": 3.3, "dense (fresh data)": 3.25}
    # the other figures hold the data arm at its first value (reuse) and say so
    fig2 = figure(plan, "loss_vs_granularity_s2b")
    assert "data reuse" in fig2["caption"]
    assert fig2["panels"][0]["reference_lines"] == {"dense baseline": 3.3}


def test_a_setting_swept_by_dotted_path_is_an_axis_and_held_elsewhere(tmp_path, capsys):
    def loss(g: str, wd: float) -> float:
        return 3.0 + float(Fraction(g)) + (wd - 0.1) ** 2

    rows = [moe_row("tiny", g, 4, optimizer_weight_decay=wd, train_loss=loss(g, wd))
            for wd in (0.1, 0.0, 0.3) for g in ("1/2", "1/4")]
    plan = write_table(tmp_path, rows, extra_planned=("optimizer_weight_decay",))
    assert cli.main(["plot", plan, "--only", "loss_vs_optimizer_weight_decay_tiny", "--only", "loss_vs_granularity_tiny"]) == 0
    capsys.readouterr()
    data = figure(plan, "loss_vs_optimizer_weight_decay_tiny")
    # weight decay 0 is on the axis: evenly spaced categories, values as they are
    assert data["panels"][0]["series"] == approx({"g 1/2, s 4": [(0.0, loss("1/2", 0.0)), (0.1, loss("1/2", 0.1)),
                                                                 (0.3, loss("1/2", 0.3))],
                                                  "g 1/4, s 4": [(0.0, loss("1/4", 0.0)), (0.1, loss("1/4", 0.1)),
                                                                 (0.3, loss("1/4", 0.3))]})
    fig2 = figure(plan, "loss_vs_granularity_tiny")
    # the granularity figure shows the runs at the first weight decay (0.1), not a mean over all three
    assert fig2["panels"][0]["series"] == approx({"sparsity 4": [(0.25, 3.25), (0.5, 3.5)]})
    assert "optimizer weight decay 0.1" in fig2["caption"]


def test_generalist_with_heterogeneous_experts_is_drawn_over_the_pairs(tmp_path, capsys):
    def loss(pair: str, gen: str) -> float:
        return 3.0 + float(Fraction(pair.split("+")[0])) + (0.03 if gen == "1/2" else 0.0)

    rows = []
    for pair in ("1/4+1/8", "1/8+1/16"):
        for gen in ("0", "1/2"):
            row = moe_row("a50m", "1/4", 8, generalist_granularity=gen, train_loss=loss(pair, gen))
            row.update(heterogeneous=True, granularity=pair, granularity_value=None, set_shares="1/2+1/2",
                       name=f"het_{pair}_{gen}".replace("/", "-"))
            rows.append(row)
    plan = write_table(tmp_path, rows)
    assert cli.main(["plot", plan, "--only", "generalist_*"]) == 0
    capsys.readouterr()
    (p,) = figure(plan, "generalist_a50m")["panels"]  # no homogeneous points: the heterogeneous panel only
    assert p["xlabel"] == "heterogeneous pair (g, g/2): g"
    assert p["series"] == approx({"no generalist": [(0.125, loss("1/8+1/16", "0")), (0.25, loss("1/4+1/8", "0"))],
                                  "generalist 1/2": [(0.125, loss("1/8+1/16", "1/2")),
                                                     (0.25, loss("1/4+1/8", "1/2"))]})


def test_load_balancing_lines_per_setting_over_n_mark_averages_holding_an_over_budget_design(tmp_path, capsys):
    designs = [("1/4", 2), ("1/8", 64), ("1/4", 128)]  # n = 8, 512, 512

    def loss(g: str, s: int, gamma: float) -> float:  # the bias rate hurts only at n >= 512
        n = s / float(Fraction(g))
        return 3.0 + float(Fraction(g)) + (0.1 if gamma and n >= 512 else 0.0)

    rows = [moe_row("a50m", g, s, aux_loss_weight=alpha, bias_update_rate=gamma, train_loss=loss(g, s, gamma),
                    moe_load_imbalance=2.0 - 100 * gamma, flops_ratio_vs_dense=1.3 if s == 64 else 1.0)
            for alpha in (0.01, 0.0001) for gamma in (0.0, 0.001) for g, s in designs]
    for r in rows:
        r["name"] += f"_a{r['aux_loss_weight']}_b{r['bias_update_rate']}"
    plan = write_table(tmp_path, rows)
    assert cli.main(["plot", plan, "--only", "load_balancing_*"]) == 0
    capsys.readouterr()
    loss_panel, imbalance, *rest = figure(plan, "load_balancing_a50m")["panels"]
    assert rest == []  # no LB loss logged: no panel for it
    at_512 = (loss("1/8", 64, 0) + loss("1/4", 128, 0)) / 2
    assert loss_panel["series"] == approx({
        f"α = {a}, γ = {b}": [(8, 3.25), (512, at_512 + (0.1 if b == "0.001" else 0))]
        for a in ("0.01", "0.0001") for b in ("0", "0.001")})
    assert imbalance["series"]["α = 0.0001, γ = 0.001"] == approx({"l": [(8, 1.9), (512, 1.9)]})["l"]
    # n = 512 averages (1/8, 64), whose true FLOPs are 1.3x dense: marked on every line
    assert loss_panel["flagged"] == {f"α = {a}, γ = {b}": [512] for a in ("0.01", "0.0001") for b in ("0", "0.001")}

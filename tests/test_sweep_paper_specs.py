"""The shipped study specs plan, and their run configs carry the paper's values.

Every spec in jobs/specs is planned and written; the checks read the values back
from the generated config.toml files (not from the spec), so a spec whose values
drift from the paper, or a planner that drops a knob, fails here.
"""

import math
import tomllib
from collections import defaultdict
from fractions import Fraction

import pytest

from jobs.sweep.plan import build_plan, write_plan
from jobs.sweep.spec_file import load_spec
from tests.sweep_support import SPECS

# full_study lists the others as its parts (tests/test_sweep_study.py plans it); ladder.yaml holds the rungs
STUDIES = sorted(p.stem for p in SPECS.glob("*.yaml") if p.stem not in ("paper_base", "full_study", "ladder"))
PAPER_STUDIES = ["main_grid", "load_balancing", "generalist", "generalist_heterogeneous", "heterogeneous",
                 "dropless_vs_default", "lr_sweep", "more_data_10m", "more_data_20m"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """study -> (index rows with their config, invalid rows); every spec planned and written once."""
    out = {}
    for study in STUDIES:
        plan_dir = tmp_path_factory.mktemp(study)
        plan = build_plan(load_spec(SPECS / f"{study}.yaml"), plan_dir)
        write_plan(plan, plan_dir)
        rows = []
        for point in plan.points:
            with open(plan_dir / point.row["config"], "rb") as f:
                rows.append({**point.row, "cfg": tomllib.load(f)})
        out[study] = (rows, plan.invalid)
    return out


def moe_rows(rows):
    return [r for r in rows if r["kind"] == "moe"]


def sets_of(row):
    return [(Fraction(s["granularity"]), s["top_k"], s["num_experts"]) for s in row["cfg"]["moe"]["expert_sets"]]


def hand_total_params(arch: dict, sets: list[tuple[Fraction, int, int]] = ()) -> int:
    """Total parameters counted by hand from a shape: untied embedding and LM head over the vocabulary
    padded to 128, a final norm, and per layer attention 4 dim^2, QK-norms 2 dim, two RMSNorms 2 dim and
    the FFN: 3 dim d_ff (dense) or, per expert set (g, k, n), a router of dim x n and n experts of
    3 dim (g d_ff)."""
    dim, layers, ffn = arch["dim"], arch["n_layers"], arch["ffn_hidden"]
    vocab = -(-arch["vocab_size"] // 128) * 128
    ffn_params = sum(dim * n + n * 3 * dim * int(g * ffn) for g, _, n in sets) if sets else 3 * dim * ffn
    return 2 * vocab * dim + dim + layers * (4 * dim * dim + 4 * dim + ffn_params)


def test_every_paper_study_has_a_spec():
    assert set(PAPER_STUDIES) <= set(STUDIES)
    assert not {"more_data", "dropless_vs_capacity"} & set(STUDIES)  # replaced by the paper's versions


@pytest.mark.parametrize("study", STUDIES)
def test_every_point_is_flop_matched_and_divisible_by_the_ep_degree(planned, study):
    rows, _ = planned[study]
    spec = load_spec(SPECS / f"{study}.yaml")
    assert rows and any(r["kind"] == "dense" for r in rows)
    for row in moe_rows(rows):
        cfg = row["cfg"]
        ep = cfg["parallelism"]["expert_parallel_degree"]
        assert ep == spec.cluster.ep_degree, row["name"]
        ratio = sum(k * g for g, k, _ in sets_of(row)) + Fraction(cfg["moe"]["generalist_granularity"])
        if spec.matching == "flop":
            assert ratio == 1 and row["flop_matched"], row["name"]
        for g, k, n in sets_of(row):
            assert n % ep == 0 and k <= n, row["name"]
            assert (g * cfg["arch"]["ffn_hidden"]).denominator == 1, row["name"]  # integral expert width
        tokens = cfg["training"]["steps"] * cfg["training"]["global_batch_size"] * cfg["training"]["seq_len"]
        assert tokens == row["tokens"]


def test_main_grid_is_the_full_granularity_by_sparsity_grid_at_five_scales(planned):
    rows, invalid = planned["main_grid"]
    assert invalid == []
    by_scale = defaultdict(set)
    for row in moe_rows(rows):
        ((g, k, n),) = sets_of(row)
        assert k * g == 1
        by_scale[row["scale"]].add((g, Fraction(n, k)))
    grid = {(Fraction(1, 2 ** i), Fraction(2 ** j)) for i in range(7) for j in range(8)}  # g 1..1/64 x s 1..128
    assert len(by_scale) == 5 and all(designs == grid for designs in by_scale.values())
    assert len(rows) == 7 * 8 * 5 + 5
    for row in rows:
        assert row["total_params"] == hand_total_params(row["cfg"]["arch"], sets_of(row) if row["kind"] == "moe" else ())
    dense = {r["scale"]: r for r in rows if r["kind"] == "dense"}
    # paper: smallest scale 50M active, 50M-930M total; models up to 6.6B total
    smallest = min(dense.values(), key=lambda r: r["active_params"])
    assert smallest["scale"] == "a50m" and smallest["active_params"] == pytest.approx(50e6, rel=0.03)
    largest_a50m = max(r["total_params"] for r in rows if r["scale"] == "a50m")
    # the a50m model at s = 128, g = 1/64 (n = 8192): 2 x 50304 x 384 + 384 + 6 x (4 x 384^2 + 4 x 384
    # + 384 x 8192 + 8192 x 3 x 384 x 15) = 910,402,944 (with its 19M of routers) <= 930M
    assert largest_a50m == 910_402_944 <= 930e6
    # the largest model: a140m at s = 128, g = 1/64 (n = 8192, expert width 25), 6.47B <= 6.6B
    assert max(r["total_params"] for r in rows) == 2 * 50304 * 640 + 640 + 16 * (
        4 * 640 ** 2 + 4 * 640 + 640 * 8192 + 8192 * 3 * 640 * 25) == 6_465_987_200
    # budget: 20 tokens per active parameter of the scale's dense model, rounded up to whole steps
    for row in rows:
        batch = row["global_batch_size"] * row["seq_len"]
        assert row["steps"] == math.ceil(20 * dense[row["scale"]]["active_params"] / batch)


def test_load_balancing_is_the_2x2_aux_weight_by_bias_rate_grid(planned):
    rows, _ = planned["load_balancing"]
    settings = defaultdict(set)
    for row in moe_rows(rows):
        moe = row["cfg"]["moe"]
        settings[sets_of(row)[0][2]].add((moe["aux_loss_weight"], moe["bias_update_rate"]))
    assert settings == {n: {(1e-2, 0.0), (1e-2, 1e-3), (1e-4, 0.0), (1e-4, 1e-3)} for n in (64, 512)}


def test_generalist_specs(planned):
    rows, _ = planned["generalist"]
    homogeneous = {Fraction(r["cfg"]["moe"]["generalist_granularity"]) for r in moe_rows(rows)}
    assert homogeneous == {0, Fraction(1, 2), Fraction(1, 4), Fraction(1, 8)}
    assert all(len(sets_of(r)) == 1 for r in moe_rows(rows))
    g8 = next(r for r in moe_rows(rows) if r["name"] == "a50m_g1-8_s8_gen1-8")
    assert sets_of(g8) == [(Fraction(1, 8), 7, 56)]  # k = (1 - 1/8) / (1/8)

    rows, invalid = planned["generalist_heterogeneous"]
    with_gen = [r for r in moe_rows(rows) if r["cfg"]["moe"]["generalist_granularity"] == "1/2"]
    assert {tuple(g for g, _, _ in sets_of(r)) for r in with_gen} == {
        (Fraction(1, 4), Fraction(1, 8)), (Fraction(1, 8), Fraction(1, 16)), (Fraction(1, 16), Fraction(1, 32))}
    # each set carries a quarter of the FFN compute next to the half-size generalist
    assert all(k * g == Fraction(1, 4) for r in with_gen for g, k, _ in sets_of(r))
    # the (1/2, 1/4) pair under g_gen = 1/2, at each of the five scales
    assert [r["reason"] for r in invalid] == 5 * ["set 0: top_k = share / g = 1/4 / 1/2 = 1/2 is not a positive integer"]


def test_heterogeneous_is_table_3(planned):
    rows, invalid = planned["heterogeneous"]
    assert invalid == []
    table3 = set()
    for g, k, sparsities in ((Fraction(1, 2), 1, (4, 8, 16, 32)), (Fraction(1, 4), 2, (4, 8, 16, 32)),
                             (Fraction(1, 8), 4, (4, 8, 16, 32)), (Fraction(1, 16), 8, (2, 4, 8, 16))):
        for s in sparsities:
            table3.add(((g, k, s * k), (g / 2, 2 * k, s * 2 * k)))
    hetero = {tuple(sets_of(r)) for r in moe_rows(rows) if r["heterogeneous"]}
    assert hetero == table3
    assert max(n for sets in hetero for _, _, n in sets) == 256


def test_dropless_vs_default_uses_megablocks_token_dropping_at_every_scale(planned):
    rows, _ = planned["dropless_vs_default"]
    by_routing = defaultdict(set)
    for row in moe_rows(rows):
        moe = row["cfg"]["moe"]
        key = (moe["routing"], moe.get("capacity_factor"), moe.get("capacity_policy"))
        by_routing[key].add((row["scale"], row["granularity"]))
    assert set(by_routing) == {("dropless", None, None), ("capacity", 1.0, "megablocks")}
    assert by_routing[("dropless", None, None)] == by_routing[("capacity", 1.0, "megablocks")]
    assert len({scale for scale, _ in by_routing[("dropless", None, None)]}) == 5


def test_megablocks_point_is_a_valid_run_config(tmp_path):
    from titan_moe.run_config.job_config import parse_run_config

    plan = build_plan(load_spec(SPECS / "dropless_vs_default.yaml"), tmp_path)
    write_plan(plan, tmp_path)
    row = next(p.row for p in plan.points if p.row["capacity_policy"] == "megablocks")
    job = parse_run_config(["--job.config_file", str(tmp_path / row["config"])])
    assert job.moe.capacity_policy == "megablocks" and job.moe.routing == "capacity"


def test_lr_sweep_runs_every_design_at_the_papers_five_learning_rates(planned):
    rows, _ = planned["lr_sweep"]
    lrs = defaultdict(set)
    for row in rows:
        lrs[row["name"].rsplit("_lr", 1)[0]].add(row["cfg"]["optimizer"]["lr"])
    assert len(lrs) == 3  # dense + two MoE designs
    assert all(v == {1e-4, 4e-4, 1e-3, 4e-3, 1e-2} for v in lrs.values())


@pytest.mark.parametrize("study, active, total, budgets", [
    ("more_data_10m", 10e6, 15e6, (200e6, 4e9)),   # paper: 10M active (10M-15M total), 200M vs 4B tokens
    ("more_data_20m", 20e6, 48e6, (400e6, 2e9)),   # paper: 20M active (20M-48M total), 400M vs 2B tokens
])
def test_more_data_studies_train_dense_and_moe_at_the_papers_two_budgets(planned, study, active, total, budgets):
    rows, invalid = planned[study]
    assert invalid == []
    for kind in ("dense", "moe"):
        tokens = sorted({r["tokens"] for r in rows if r["kind"] == kind})
        batch = rows[0]["global_batch_size"] * rows[0]["seq_len"]
        assert len(tokens) == 2 and all(0 <= t - b < batch for t, b in zip(tokens, budgets)), kind
    assert all(r["active_params"] == pytest.approx(active, rel=0.06) for r in rows)
    for row in rows:
        assert row["total_params"] == hand_total_params(row["cfg"]["arch"], sets_of(row) if row["kind"] == "moe" else ())
    # the designs span the paper's total range: the dense model at its bottom, s = 32 within 7% of its top
    assert min(r["total_params"] for r in rows) == pytest.approx(active, rel=0.03)
    assert 0.93 * total <= max(r["total_params"] for r in rows) <= total
    assert max(r["sparsity_value"] for r in moe_rows(rows)) == 32

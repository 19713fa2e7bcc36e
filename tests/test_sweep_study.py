"""True FLOPs beside the matching rule, and the paper's full study in tiers (jobs/specs/full_study.yaml)."""

import csv
import json
from collections import defaultdict
from fractions import Fraction

import pytest

from jobs.sweep import cli
from jobs.sweep.cost import tier_rows
from jobs.sweep.spec_file import load_spec
from jobs.sweep.study import build
from tests.sweep_support import SPECS, make_spec, spec_doc, write_spec


def hand_flops_per_token(arch: dict, seq_len: int, sets: list[tuple[int, Fraction, int]], g_gen: Fraction) -> int:
    """6 x non-embedding active params + 12 x L x H x head_dim x seq_len, counted by hand from the shape:
    per layer attention 4 dim^2 + QK-norms 2 dim + two RMSNorms 2 dim, FFN 3 dim d_ff (dense) or, per
    expert set (n, g, k), a router of dim x n plus k active experts of 3 dim (g d_ff), plus a generalist
    of 3 dim (g_gen d_ff); the LM head (vocabulary padded to 128) and the final norm."""
    dim, layers, heads, ffn = arch["dim"], arch["n_layers"], arch["n_heads"], arch["ffn_hidden"]
    vocab = -(-arch["vocab_size"] // 128) * 128
    if sets:
        ffn_params = sum(dim * n + k * 3 * dim * int(g * ffn) for n, g, k in sets) + 3 * dim * int(g_gen * ffn)
    else:
        ffn_params = 3 * dim * ffn
    per_layer = 4 * dim * dim + 2 * dim + 2 * dim + ffn_params
    params = layers * per_layer + vocab * dim + dim
    return 6 * params + 12 * layers * heads * (dim // heads) * seq_len


def test_flops_ratio_vs_dense_is_the_true_count_for_every_point(tmp_path, capsys):
    arch2 = {"dim": 64, "n_layers": 3, "n_heads": 4, "ffn_hidden": 256, "vocab_size": 300}
    path = write_spec(tmp_path, spec_doc(
        scales=[{"name": "tiny", "arch": {"dim": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 128, "vocab_size": 300}},
                {"name": "deep", "arch": arch2}],
        moe={"granularities": ["1", "1/4", "1/64"], "sparsities": [1, 64],
             "heterogeneous": [[{"granularity": "1/2", "sparsity": 4}, {"granularity": "1/4", "sparsity": 4}]],
             "generalist_granularities": ["0", "1/2"]}))
    out = tmp_path / "plan"
    assert cli.main(["plan", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    spec = load_spec(path)
    archs = {s.name: s.arch for s in spec.scales}
    with open(out / "index.csv") as f:
        csv_ratio = {r["name"]: float(r["flops_ratio_vs_dense"]) for r in csv.DictReader(f)}
    over = []
    for row in index["points"]:
        cfg_sets = []
        if row["kind"] == "moe":
            for text in row["expert_sets"].split("; "):  # "64x1/4 top-4"
                n, rest = text.split("x", 1)
                g, k = rest.split(" top-")
                cfg_sets.append((int(n), Fraction(g), int(k)))
        g_gen = Fraction(row["generalist_granularity"] or "0")
        arch = archs[row["scale"]]
        mine = hand_flops_per_token(arch, 16, cfg_sets, g_gen)
        dense = hand_flops_per_token(arch, 16, [], Fraction(0))
        assert row["flops_per_token"] == mine and row["dense_flops_per_token"] == dense, row["name"]
        assert row["flops_ratio_vs_dense"] == pytest.approx(mine / dense, rel=1e-12), row["name"]
        assert csv_ratio[row["name"]] == pytest.approx(mine / dense, rel=1e-9)
        # FLOP-matched by the paper's rule, so the excess is exactly the routers: 6 x L x dim x n
        routers = 6 * arch["n_layers"] * arch["dim"] * sum(n for n, _, _ in cfg_sets)
        assert mine - dense == routers, row["name"]
        if mine / dense > 1.05:
            over.append((mine / dense, row["name"]))
    # g = 1/64, s = 64 at dim 32: 4096 experts -> routers 6*2*32*4096 on a 284,352 FLOPs/token dense model
    assert max(over)[1] == "tiny_g1-64_s64"
    assert f"{len(over)} points cost more than 1.05x" in printed and f"worst {max(over)[1]} at {max(over)[0]:.3f}x" in printed
    assert index["summary"]["above_flops_tolerance"] == len(over)


def test_limits_mark_points_invalid_with_the_reason(tmp_path):
    moe = {"granularities": ["1", "1/4"], "sparsities": [1, 64]}
    # s = 64: 64 full-size or 256 quarter-size experts per layer, ~1.6M total params each
    plan = build(make_spec(tmp_path, moe=moe, limits={"max_total_params": 1_000_000}), tmp_path / "p")
    assert {r["name"]: r["reason"].split(" exceed ")[1] for r in plan.invalid} == {
        "tiny_g1_s64": "spec.limits.max_total_params 1,000,000 (the largest model the study runs)",
        "tiny_g1-4_s64": "spec.limits.max_total_params 1,000,000 (the largest model the study runs)"}
    # routers 6 x 2 layers x dim 32 x n on a 284,352 FLOPs/token dense model: n = 64 -> 1.086x, n = 256 -> 1.346x
    plan = build(make_spec(tmp_path, moe=moe, limits={"max_flops_ratio_vs_dense": 1.05}), tmp_path / "q")
    assert {r["name"]: r["reason"].split(" exceed ")[0] for r in plan.invalid} == {
        "tiny_g1_s64": "true FLOPs per token 1.086x the dense baseline's (routers included)",
        "tiny_g1-4_s64": "true FLOPs per token 1.346x the dense baseline's (routers included)"}
    assert all(p.row["flops_ratio_vs_dense"] <= 1.05 for p in plan.points) and len(plan.points) == 3


def test_study_parts_dedupe_identical_runs_at_the_lowest_tier(tmp_path, capsys):
    write_spec(tmp_path, spec_doc(name="grid", moe={"granularities": ["1", "1/2"], "sparsities": [2]}), "grid.yaml")
    study = write_spec(tmp_path, {"name": "study", "parts": [
        {"spec": "grid.yaml", "tier": 2, "set": {"name": "lb", "moe.aux_loss_weights": [0.01, 0.001]}},
        {"spec": "grid.yaml", "tier": 1},
    ]}, "study.yaml")
    plan = build(load_spec(study), tmp_path / "p")
    rows = {p.name: p.row for p in plan.points}
    # the grid's points (aux 0.01 is the schema default) are planned once, at tier 1, under tier 1's names
    assert {n: (r["tier"], r["spec"]) for n, r in rows.items()} == {
        "tiny_dense": (1, "grid"), "tiny_g1_s2": (1, "grid"), "tiny_g1-2_s2": (1, "grid"),
        "tiny_g1_s2_aux0.001": (2, "lb"), "tiny_g1-2_s2_aux0.001": (2, "lb")}
    assert [(r["tier"], r["points"], r["cumulative_points"]) for r in tier_rows(plan)] == [(1, 3, 3), (2, 2, 5)]
    assert [p.name for p in build(load_spec(study), tmp_path / "q", max_tier=1).points] == [
        "tiny_dense", "tiny_g1_s2", "tiny_g1-2_s2"]
    # `sweep cost` prints GPU-hours per tier and the running total
    assert cli.main(["cost", str(study), "--mfu", "0.5", "--peak-tflops", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tier_lines = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("study  ") and "tier" in x)) + 1:]]
    hours = {t: sum(p.row["gpu_hours"] for p in plan.points if p.row["tier"] == t) for t in (1, 2)}
    assert [(t[1], t[2], t[4]) for t in tier_lines] == [("1", "3", "3"), ("2", "2", "5")]
    assert tier_lines[1][5] == f"{hours[1] + hours[2]:.4g}"


# --------------------------------------------------------------------------- the shipped full study
@pytest.fixture(scope="module")
def full():
    return build(load_spec(SPECS / "full_study.yaml"), "/nonexistent/plan")


def test_full_study_plans_over_2000_valid_points_each_with_a_tier(full):
    rows = [p.row for p in full.points]
    assert len(rows) >= 2000
    assert all(isinstance(r["tier"], int) and 1 <= r["tier"] <= 6 for r in rows)
    assert len({json.dumps(p.config | {"job": {}}, sort_keys=True) for p in full.points}) == len(rows)  # no duplicate runs
    # the crossing: g 1..1/64 x s 1..128 x aux {1e-2, 1e-4} x gamma {0, 1e-3} x {dropless, megablocks} at 5 scales
    main = {"a50m", "a64m", "a82m", "a108m", "a140m"}
    crossing = defaultdict(set)
    for r in rows:
        if r["kind"] == "moe" and not r["heterogeneous"] and r["generalist_granularity"] == "0" and r["scale"] in main:
            crossing[r["scale"]].add((r["granularity"], r["sparsity"], r["aux_loss_weight"], r["bias_update_rate"],
                                      r["routing"], r["capacity_policy"]))
    assert set(crossing) == main
    # 7 granularities x 8 sparsities x 2 x 2 x 2 at every main scale: 448, 2,240 in all
    assert all(len(crossing[s]) == 7 * 8 * 8 for s in main)
    assert sum(len(c) for c in crossing.values()) == 2240
    assert {g for c in crossing.values() for g, *_ in c} == {"1", "1/2", "1/4", "1/8", "1/16", "1/32", "1/64"}
    assert {s for c in crossing.values() for _, s, *_ in c} == {str(2 ** j) for j in range(8)}  # s stops at 128
    # by tier: the grid at the reference setting + dense (tier 1); tier 4 the load-balancing study's three
    # other settings at 2 designs and dropless_vs_default's capacity arm at 3 granularities, 5 scales each;
    # tier 6 the rest of the crossing (7 x 8 designs x 7 non-reference settings x 5 scales, less tier 4's)
    tiers = defaultdict(int)
    for r in rows:
        tiers[r["tier"]] += 1
    assert tiers[1] == 7 * 8 * 5 + 5
    assert tiers[4] == 2 * 3 * 5 + 3 * 5
    assert tiers[6] == 7 * 8 * 7 * 5 - tiers[4]
    # every part runs at EP 1, so a design two parts share is one run (not one per EP degree)
    assert {r["ep_degree"] for r in rows} == {1}
    design = [(r["scale"], r["expert_sets"], r["generalist_granularity"], r["routing"], r["capacity_policy"],
               r["aux_loss_weight"], r["bias_update_rate"], r["lr"], r["token_multiple"], r["seed"]) for r in rows]
    assert len(set(design)) == len(design)
    # the only invalid designs: a half-size set next to the g_gen = 1/2 generalist (top-k 1/2) at each scale
    assert sorted(r["scale"] for r in full.invalid) == sorted(main)
    assert all("is not a positive integer" in r["reason"] for r in full.invalid)
    assert all(r["total_params"] <= 6.6e9 for r in rows)
    # the side studies at every main scale; the appendix at 10M and 20M active with two budgets each
    for spec in ("generalist", "heterogeneous", "generalist_heterogeneous", "load_balancing"):
        assert {r["scale"] for r in rows if r["spec"] == spec} == main, spec
    gens = {(r["scale"], r["generalist_granularity"]) for r in rows if r["kind"] == "moe" and not r["heterogeneous"]}
    assert all((s, g) in gens for s in main for g in ("1/2", "1/4", "1/8"))
    for scale in ("a10m", "a20m"):
        assert len({r["tokens"] for r in rows if r["scale"] == scale and r["kind"] == "dense"}) == 2
    # the lr sweep's designs at lr 1e-3 (paper_base's) are main-grid points, planned once at tier 1
    swept = {r["name"].rsplit("_lr", 1)[0] for r in rows if r["spec"] == "lr_sweep"}
    assert {r["lr"] for r in rows if r["spec"] == "lr_sweep"} == {1e-4, 4e-4, 4e-3, 1e-2}
    assert {r["name"] for r in rows if r["spec"] == "main_grid" and r["name"] in swept} == swept


def test_max_tier_1_is_the_headline_grid_a_strict_subset(full, tmp_path, capsys):
    tier1 = {p.name for p in full.points if p.row["tier"] == 1}
    out = tmp_path / "t1"
    path = SPECS / "full_study.yaml"
    assert cli.main(["plan", str(path), "--out", str(out), "--max-tier", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    with open(out / "index.csv") as f:
        planned = [r for r in csv.DictReader(f)]
    assert {r["name"] for r in planned} == tier1 and tier1 < {p.name for p in full.points}
    assert {r["tier"] for r in planned} == {"1"}
    assert len(planned) == 7 * 8 * 5 + 5  # the 56-design grid (g 1..1/64 x s 1..128) at five scales + dense
    assert "(tiers <= 1)" in printed
    # GPU-hours per tier and cumulative: the tiers add up to the whole study
    tiers = tier_rows(full)
    assert [t["tier"] for t in tiers] == [1, 2, 3, 4, 5, 6]
    assert tiers[-1]["cumulative_gpu_hours"] == pytest.approx(sum(p.row["gpu_hours"] for p in full.points))
    assert tiers[0]["gpu_hours"] == pytest.approx(sum(float(r["gpu_hours"]) for r in planned), rel=1e-9)

"""The scale ladder (jobs/specs/ladder.yaml) meets every anchor the paper states, all at once.

Counts are ``titan_moe.model.accounting.describe``'s (what ``titan-moe describe``
prints), built from the YAML shapes; the paper's anchors (the reference notes'
summary of its text) are the literals below.  The ladder file is read directly, so
this test does not depend on how study specs resolve rung names.
"""

from fractions import Fraction

import pytest
import yaml

from tests.sweep_support import SPECS
from titan_moe.model.accounting import describe
from titan_moe.model.args import TitanMoEModelArgs

SEQ_LEN = 2048
MAIN = ["a50m", "a64m", "a82m", "a108m", "a140m"]
APPENDIX = ["a10m", "a20m"]
# The largest planned sparsity per rung (INFERRED; ladder.yaml says why) and the finest
# granularity of the paper's grid: the largest model a rung plans has n = s / g experts.
MAX_SPARSITY = {"a10m": 32, "a20m": 32, **{name: 128 for name in MAIN}}
FINEST_G = Fraction(1, 64)


def _rungs() -> dict[str, dict]:
    doc = yaml.safe_load((SPECS / "ladder.yaml").read_text())
    return {r["name"]: r["arch"] for r in doc["ladder"]}


RUNGS = _rungs()


def counts(name: str, sparsity: int = 1, granularity: Fraction = FINEST_G) -> dict:
    """describe() of a rung's dense model (sparsity 1) or of its FLOP-matched MoE (k = 1/g, n = s k)."""
    moe = None
    if sparsity > 1:
        k = int(1 / granularity)
        moe = {"enabled": True,
               "expert_sets": [{"num_experts": sparsity * k, "granularity": str(granularity), "top_k": k}]}
    return describe(TitanMoEModelArgs.from_sections(RUNGS[name], moe, SEQ_LEN), SEQ_LEN)


def largest_total(name: str) -> int:
    return counts(name, MAX_SPARSITY[name])["total_params"]


def test_ladder_holds_the_appendix_and_the_five_main_rungs_that_paper_base_names():
    assert list(RUNGS) == APPENDIX + MAIN
    base = yaml.safe_load((SPECS / "paper_base.yaml").read_text())
    assert base["extends"] == "ladder.yaml"
    assert base["scales"] == MAIN  # paper: five active-parameter scales in the main study


def test_smallest_main_scale_is_50m_active_and_at_most_930m_total():
    dense = counts("a50m")
    assert dense["active_params"] == pytest.approx(50e6, rel=0.03)  # paper: 50M active
    # paper: 50M-930M total; the largest planned model (s = 128, g = 1/64, routers included)
    total = largest_total("a50m")
    assert 0.95 * 930e6 <= total <= 930e6
    # This anchor binds: s = 256 at this shape would be 1.9x the paper's range.
    assert counts("a50m", 256)["total_params"] > 1.9 * 930e6


def test_largest_model_of_the_study_is_just_under_6_6b_total():
    totals = {name: largest_total(name) for name in RUNGS}
    assert max(totals, key=totals.get) == "a140m"
    assert 0.97 * 6.6e9 <= max(totals.values()) <= 6.6e9  # paper: models up to 6.6B total


def test_extreme_ratio_128_is_planned_at_every_main_scale_with_integral_expert_widths():
    for name in MAIN:
        d = counts(name, 128)  # builds: g = 1/64 gives an integral expert width
        assert d["expert_sets"][0]["sparsity"] == 128 and d["flop_matched"]
        assert d["expert_sets"][0]["hidden_dim"] * 64 == RUNGS[name]["ffn_hidden"]


@pytest.mark.parametrize("name, active, low, high", [
    ("a10m", 10e6, 10e6, 15e6),   # paper appendix: 10M active, 10M-15M total
    ("a20m", 20e6, 20e6, 48e6),   # paper appendix: 20M active, 20M-48M total
])
def test_appendix_rungs_stay_inside_the_papers_total_ranges(name, active, low, high):
    dense = counts(name)
    assert dense["active_params"] == pytest.approx(active, rel=0.03)
    assert dense["total_params"] == pytest.approx(low, rel=0.03) and largest_total(name) <= high
    # and at the coarsest appendix design (g = 1/2) the same sparsity stays in range too
    assert counts(name, MAX_SPARSITY[name], Fraction(1, 2))["total_params"] <= high


def test_depth_width_and_heads_grow_with_scale():
    ordered = sorted(RUNGS, key=lambda n: counts(n)["active_params"])
    assert ordered == APPENDIX + MAIN
    for key in ("n_layers", "dim", "n_heads"):
        values = [RUNGS[n][key] for n in ordered]
        assert values == sorted(set(values)), key  # strictly increasing


def test_ffn_share_grows_and_the_ffn_to_dim_ratio_is_constant_on_the_main_rungs():
    shares = []
    for name in MAIN:
        arch, d = RUNGS[name], counts(name)
        assert d["dense_ffn_params_per_layer"] * d["n_layers"] == 3 * arch["dim"] * arch["ffn_hidden"] * arch["n_layers"]
        shares.append(d["dense_ffn_params_per_layer"] * d["n_layers"] / d["active_params"])
        # d_ff = 2.5 x dim rounded to a multiple of 64: g is the same expert shape at every scale
        assert arch["ffn_hidden"] % 64 == 0 and abs(arch["ffn_hidden"] / arch["dim"] - 2.5) <= 0.08
    assert shares == sorted(shares) and shares[0] > 0.13 and shares[-1] > 0.35


def test_main_actives_are_spaced_geometrically():
    actives = [counts(n)["active_params"] for n in MAIN]
    steps = [b / a for a, b in zip(actives, actives[1:])]
    assert all(1.25 <= s <= 1.35 for s in steps), steps


def test_each_rung_carries_its_max_sparsity_and_the_planner_lists_designs_beyond_it(tmp_path):
    """The bound travels with the ladder: a study that asks for s = 256 at a main rung gets it in
    invalid.csv with the reason, whatever its own grid says."""
    from jobs.sweep.plan import build_plan
    from jobs.sweep.spec_file import load_spec

    doc = yaml.safe_load((SPECS / "ladder.yaml").read_text())
    assert {r["name"]: r["max_sparsity"] for r in doc["ladder"]} == MAX_SPARSITY
    spec = load_spec(SPECS / "main_grid.yaml", ["scales=[a50m, a10m]", "moe.granularities=[1/4]",
                                                 "moe.sparsities=[32, 64, 128, 256]"])
    plan = build_plan(spec, tmp_path)
    planned = {(p.row["scale"], p.row["sparsity"]) for p in plan.points if p.row["kind"] == "moe"}
    assert planned == {("a50m", "32"), ("a50m", "64"), ("a50m", "128"), ("a10m", "32")}
    assert {r["name"]: r["reason"] for r in plan.invalid} == {
        "a50m_g1-4_s256": "sparsity 256 exceeds scale a50m's max_sparsity 128 (the ladder rung's bound: "
                          "its anchor on total params)",
        **{f"a10m_g1-4_s{s}": f"sparsity {s} exceeds scale a10m's max_sparsity 32 (the ladder rung's bound: "
                              "its anchor on total params)" for s in (64, 128, 256)}}

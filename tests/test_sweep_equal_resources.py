"""The equal-resources study: its two data arms' token and repeat numbers, and the shipped spec.

The arms' numbers are checked against values computed by hand from the tiny
shape of tests.sweep_support (dim 32, 2 layers, 4 heads, d_ff 128, vocab 300
padded to 384, QK-norm, seq_len 16, 8 sequences per step = 128 tokens)::

    dense: active = 2 x 384 x 32 + 32 + 2 x (4 x 32^2 + 4 x 32 + 3 x 32 x 128) = 57,632
           non-embedding active = 57,632 - 12,288 = 45,344
           FLOPs/token = 6 x 45,344 + 12 x 2 layers x 4 heads x 8 x 16 = 284,352
           tokens = 20 x 45,344 = 906,880 = 7,085 steps x 128 exactly
    MoE g = 1/4, s = 2: n = 4 experts of width 32, k = 2; per layer the experts
           hold 12,288 params (6,144 active) and the router 4 x 32 = 128
           active = 57,632 - 2 x 12,288 + 2 x (6,144 + 128) = 45,600
           FLOPs/token = 6 x (45,600 - 12,288) + 12,288 = 212,160
           steps = round(284,352 x 906,880 / 212,160 / 128) = round(9,495.8) = 9,496
           tokens = 9,496 x 128 = 1,215,488
      reuse: unique 906,880 (the dense run's), repeat 1,215,488 / 906,880
      fresh: unique 1,215,488, repeat 1
"""

import csv
import tomllib
from fractions import Fraction

import pytest
import yaml

from jobs.sweep.plan import build_plan, write_plan
from jobs.sweep.spec import OLMOE_SOURCES
from jobs.sweep.spec_check import parse_spec
from jobs.sweep.spec_file import deep_merge
from titan_moe.common.errors import ConfigError
from tests.sweep_support import SPECS, make_spec, spec_doc

DENSE_TOKENS = 906_880
MOE_STEPS, MOE_TOKENS = 9_496, 1_215_488


def _config(plan_dir, row):
    with open(plan_dir / row["config"], "rb") as f:
        return tomllib.load(f)


def test_reuse_and_fresh_arms_match_the_hand_computed_budget(tmp_path):
    spec = make_spec(tmp_path, matching="equal_resources", moe={"granularities": ["1/4"], "sparsities": [2]},
                     equal_resources={"data_arms": ["reuse", "fresh"]})
    out = tmp_path / "plan"
    plan = build_plan(spec, out)
    write_plan(plan, out)
    rows = {p.name: p.row for p in plan.points}
    assert list(rows) == ["tiny_dense", "tiny_g1-4_s2_reuse", "tiny_g1-4_s2_fresh"]
    dense, reuse, fresh = rows.values()
    assert (dense["active_params"], dense["flops_per_token"]) == (57_632, 284_352)
    assert (dense["steps"], dense["tokens"], dense["unique_tokens"], dense["data_repeat"]) == (7_085, DENSE_TOKENS, DENSE_TOKENS, 1.0)
    assert dense["data_arm"] == ""
    for row, arm in ((reuse, "reuse"), (fresh, "fresh")):
        assert row["data_arm"] == arm
        assert (row["num_experts"], row["top_k"], row["active_params"], row["flops_per_token"]) == (4, 2, 45_600, 212_160)
        assert (row["steps"], row["tokens"]) == (MOE_STEPS, MOE_TOKENS)  # same compute in both arms
    assert (reuse["unique_tokens"], reuse["data_repeat"]) == (DENSE_TOKENS, MOE_TOKENS / DENSE_TOKENS)
    assert (fresh["unique_tokens"], fresh["data_repeat"]) == (MOE_TOKENS, 1.0)

    # the run configs tell the loader the same: reuse repeats every source, fresh draws unique tokens
    assert _config(out, dense)["data"] == {"token_budget": DENSE_TOKENS}
    assert _config(out, reuse)["data"] == {"token_budget": MOE_TOKENS,
                                           "repeat": {s: MOE_TOKENS / DENSE_TOKENS for s in OLMOE_SOURCES}}
    assert _config(out, fresh)["data"] == {"token_budget": MOE_TOKENS}
    with open(out / "index.csv", newline="") as f:
        assert [r["data_arm"] for r in csv.DictReader(f)] == ["", "reuse", "fresh"]


def test_one_arm_keeps_the_plain_names(tmp_path):
    spec = make_spec(tmp_path, matching="equal_resources", moe={"granularities": ["1/4"], "sparsities": [2]},
                     equal_resources={"data_arms": ["fresh"]})
    (moe,) = [p.row for p in build_plan(spec, tmp_path / "plan").points if p.row["kind"] == "moe"]
    assert (moe["name"], moe["data_arm"], moe["unique_tokens"]) == ("tiny_g1-4_s2", "fresh", MOE_TOKENS)


@pytest.mark.parametrize("changes, field, words", [
    ({"matching": "equal_resources", "equal_resources": {"data_arms": ["reuse", "resample"]}},
     "spec.equal_resources.data_arms[1]", "choose from reuse, fresh"),
    ({"matching": "equal_resources", "equal_resources": {"data_arms": ["reuse", "reuse"]}},
     "spec.equal_resources.data_arms", "twice"),
    ({"equal_resources": {"data_arms": ["fresh"]}},
     "spec.equal_resources.data_arms", "only applies to matching: equal_resources"),
])
def test_bad_data_arms_are_refused_naming_the_field(changes, field, words):
    with pytest.raises(ConfigError) as err:
        parse_spec(spec_doc(**changes))
    assert err.value.field == field and words in str(err.value)


def _shipped_spec():
    """equal_resources.yaml merged onto paper_base.yaml (without the ladder: it plans its own scales)."""
    base = yaml.safe_load((SPECS / "paper_base.yaml").read_text())
    top = yaml.safe_load((SPECS / "equal_resources.yaml").read_text())
    assert top.pop("extends") == "paper_base.yaml"
    for key in ("extends", "ladder", "scales"):
        base.pop(key, None)
    return parse_spec(deep_merge(base, top))


def test_shipped_spec_plans_a_fine_activation_grid_in_both_arms_at_2b_and_7b(tmp_path):
    spec = _shipped_spec()
    plan = build_plan(spec, tmp_path)
    routers = {s.name: 64 * s.arch["dim"] * s.arch["n_layers"] for s in spec.scales}  # 64 experts per layer
    assert plan.invalid == []
    rows = [p.row for p in plan.points]
    dense = {r["scale"]: r for r in rows if r["kind"] == "dense"}
    # paper: 2B and 7B total parameters
    assert dense["t2b"]["total_params"] == pytest.approx(2e9, rel=0.02)
    assert dense["t7b"]["total_params"] == pytest.approx(7e9, rel=0.02)
    moe = [r for r in rows if r["kind"] == "moe"]
    rates = {(r["scale"], r["data_arm"]): set() for r in moe}
    for r in moe:
        d = dense[r["scale"]]
        # the dense model's total parameters (the routers are the only extra)
        assert r["num_experts"] == 64 and r["total_params"] - routers[r["scale"]] == d["total_params"]
        assert abs(r["train_flops"] - d["train_flops"]) <= r["flops_per_token"] * r["global_batch_size"] * r["seq_len"] / 2
        if r["data_arm"] == "reuse":
            assert r["unique_tokens"] == d["tokens"] and r["data_repeat"] == r["tokens"] / d["tokens"] > 1
        else:
            assert r["unique_tokens"] == r["tokens"] and r["data_repeat"] == 1.0
        rates[(r["scale"], r["data_arm"])].add(Fraction(r["top_k"], r["num_experts"]))
    grid = {Fraction(k, 64) for k in (32, 24, 20, 16, 14, 13, 12, 10, 8, 6, 4)}
    assert rates == {(s, a): grid for s in ("t2b", "t7b") for a in ("reuse", "fresh")}
    # finer than 1/64 steps around the ~20% optimum: 3/16, 13/64, 7/32 are all planned
    assert {Fraction(12, 64), Fraction(13, 64), Fraction(14, 64)} <= grid

"""The planner: FLOP matching, budgets that agree with `titan-moe describe`, equal resources, invalid points."""

import csv
import json
import math
import tomllib
from fractions import Fraction

import pytest

from jobs.sweep import cli
from jobs.sweep.plan import build_plan, write_plan
from jobs.sweep.spec import OLMOE_SOURCES
from jobs.sweep.spec_file import load_spec
from titan_moe import describe as describe_cli
from titan_moe.common.errors import ConfigError
from tests.sweep_support import ARCH, SPECS, make_spec

GRANULARITIES = ["1", "1/2", "1/4", "1/8", "1/16", "1/32", "1/64"]
SPARSITIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BATCH_TOKENS = 8 * 16  # global_batch_size x seq_len of tests.sweep_support.BASE


def _config(plan_dir, row):
    with open(plan_dir / row["config"], "rb") as f:
        return tomllib.load(f)


def _routers(row, dim=32, layers=2):
    return layers * dim * row["num_experts"]


def test_every_point_of_the_full_grid_is_flop_matched_and_each_scale_has_its_dense_baseline(tmp_path):
    wide = {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_hidden": 256, "vocab_size": 300}
    spec = make_spec(tmp_path, scales=[{"name": "tiny", "arch": ARCH}, {"name": "wide", "arch": wide}],
                     moe={"granularities": GRANULARITIES, "sparsities": SPARSITIES})
    plan = build_plan(spec, tmp_path / "plan")
    assert plan.invalid == []
    rows = [p.row for p in plan.points]
    for scale, dim in (("tiny", 32), ("wide", 64)):
        mine = [r for r in rows if r["scale"] == scale]
        dense = [r for r in mine if r["kind"] == "dense"]
        assert len(dense) == 1 and dense[0]["flop_matched"]
        moe = [r for r in mine if r["kind"] == "moe"]
        assert len(moe) == len(GRANULARITIES) * len(SPARSITIES)
        for r in moe:
            g, s = Fraction(r["granularity"]), Fraction(r["sparsity"])
            assert r["flop_matched"] is True and r["flop_ratio"] == "1", r["name"]
            assert r["top_k"] * g == 1 and r["num_experts"] == s * r["top_k"], r["name"]
            # FLOP-matched: the same active parameters as dense, up to the router.
            assert r["active_params"] - _routers(r, dim) == dense[0]["active_params"], r["name"]
    finest = next(r for r in rows if r["name"] == "tiny_g1-64_s256")
    assert (finest["num_experts"], finest["top_k"]) == (16384, 64)


def test_generalist_and_heterogeneous_points_are_flop_matched(tmp_path):
    moe = {"granularities": ["1/4", "1/8"], "sparsities": [4], "generalist_granularities": ["0", "1/4", "1/2"],
           "heterogeneous": [[{"granularity": "1/2", "sparsity": 4}, {"granularity": "1/8", "sparsity": 8}],
                             [{"granularity": "1/4", "sparsity": 2, "share": "1/4"},
                              {"granularity": "1/16", "sparsity": 2, "share": "3/4"}]]}
    plan = build_plan(make_spec(tmp_path, moe=moe), tmp_path / "plan")
    write_plan(plan, tmp_path / "plan")
    moe_rows = [p.row for p in plan.points if p.row["kind"] == "moe"]
    reasons = {r["name"]: r["reason"] for r in plan.invalid}
    # With a generalist, (1 - g_gen) / 2 per set leaves a fractional top-k for the 1/2 set,
    # and the explicit 1/4 + 3/4 shares no longer sum to 1 - g_gen.
    assert reasons == {
        "tiny_het-g1-2s4+g1-8s8_gen1-4": "set 0: top_k = share / g = 3/8 / 1/2 = 3/4 is not a positive integer",
        "tiny_het-g1-2s4+g1-8s8_gen1-2": "set 0: top_k = share / g = 1/4 / 1/2 = 1/2 is not a positive integer",
        "tiny_het-g1-4s2w1-4+g1-16s2w3-4_gen1-4": "FLOP shares 1/4 + 3/4 = 1 must sum to 1 - generalist_granularity = 3/4",
        "tiny_het-g1-4s2w1-4+g1-16s2w3-4_gen1-2": "FLOP shares 1/4 + 3/4 = 1 must sum to 1 - generalist_granularity = 1/2",
    }
    assert len(moe_rows) == 6 + 2
    for r in moe_rows:
        section = _config(tmp_path / "plan", r)["moe"]
        ratio = sum(s["top_k"] * Fraction(s["granularity"]) for s in section["expert_sets"])
        assert ratio + Fraction(section["generalist_granularity"]) == 1, r["name"]
        assert section["require_flop_match"] is True
    by_name = {r["name"]: r for r in moe_rows}
    assert by_name["tiny_g1-8_s4_gen1-4"]["expert_sets"] == "24x1/8 top-6"  # k = (1 - 1/4) / (1/8)
    assert by_name["tiny_het-g1-2s4+g1-8s8"]["expert_sets"] == "4x1/2 top-1; 32x1/8 top-4"
    shares = by_name["tiny_het-g1-4s2w1-4+g1-16s2w3-4"]
    assert shares["expert_sets"] == "2x1/4 top-1; 24x1/16 top-12" and shares["set_shares"] == "1/4+3/4"
    assert shares["sparsity_value"] == 2.0


def test_token_budgets_and_flops_agree_with_titan_moe_describe(tmp_path, capsys):
    make_spec(tmp_path, moe={"granularities": ["1/2", "1/8"], "sparsities": [4]},
              budget={"tokens_per_param": 20, "multiples": [1, 2]}, learning_rates=[1e-3, 3e-3],
              schedule={"warmup_fraction": 0.01})
    out = tmp_path / "plan"
    assert cli.main(["plan", str(tmp_path / "spec.yaml"), "--out", str(out)]) == 0
    assert "planned 12 points (4 dense, 8 MoE)" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    rows = index["points"]
    with open(out / "index.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == [r["name"] for r in rows]

    dense = next(r for r in rows if r["name"] == "tiny_dense_x1_lr0.001")
    # Hand count for ARCH (dim 32, 2 layers, 4 heads, ffn 128, vocab 300 -> 384):
    # per layer 4*32*32 + 2*32 (attention, QK-norm) + 2*32 (norms) + 3*32*128 (SwiGLU) = 16512;
    # LM head 384*32 + final norm 32 -> non-embedding active 2*16512 + 12288 + 32 = 45344.
    assert dense["non_embedding_active_params"] == 45344
    assert dense["flops_per_token"] == 6 * 45344 + 12 * 2 * 4 * 8 * 16
    assert dense["steps"] == math.ceil(20 * 45344 / BATCH_TOKENS) == 7085

    for row in rows:
        assert describe_cli.main([str(out / row["config"]), "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        for key in ("total_params", "active_params", "embedding_params", "non_embedding_active_params", "flops_per_token"):
            assert row[key] == d[key], (row["name"], key)
        multiple = row["token_multiple"]
        # basis dense: every point of the scale trains on its dense baseline's budget
        assert row["steps"] == math.ceil(20 * multiple * 45344 / BATCH_TOKENS)
        assert row["tokens"] == row["steps"] * BATCH_TOKENS == row["unique_tokens"]
        assert row["train_flops"] == d["flops_per_token"] * row["tokens"]
        assert row["gpu_hours"] == pytest.approx(row["train_flops"] / (0.5 * 100e12) / 3600)
        config = _config(out, row)
        assert config["training"]["steps"] == row["steps"]
        assert config["lr_scheduler"]["warmup_steps"] == row["warmup_steps"] == max(1, round(0.01 * row["steps"]))
        assert config["optimizer"]["lr"] == row["lr"] and config["debug"]["seed"] == row["seed"]
        assert config["job"]["dump_folder"] == str((out / row["config"]).parent)
        assert config["metrics"]["enable_tensorboard"] is True
    assert index["summary"]["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in rows))


def test_point_basis_budgets_follow_each_points_own_params(tmp_path):
    plan = build_plan(make_spec(tmp_path, budget={"tokens_per_param": 20, "basis": "point"}), tmp_path / "p")
    for row in (p.row for p in plan.points):
        assert row["steps"] == math.ceil(20 * row["non_embedding_active_params"] / BATCH_TOKENS)
    moe_steps = {p.row["steps"] for p in plan.points if p.row["kind"] == "moe"}
    assert min(moe_steps) > next(p.row["steps"] for p in plan.points if p.row["kind"] == "dense")  # routers count


def test_equal_resources_gives_equal_total_params_training_flops_and_unique_tokens(tmp_path):
    spec = make_spec(tmp_path, matching="equal_resources",
                     moe={"granularities": ["1/4", "1/8", "1/16"], "sparsities": [2, 4, 8, 16]})
    out = tmp_path / "plan"
    plan = build_plan(spec, out)
    write_plan(plan, out)
    rows = [p.row for p in plan.points]
    dense = next(r for r in rows if r["kind"] == "dense")
    dense_flops = dense["train_flops"]
    moe = [r for r in rows if r["kind"] == "moe"]
    # n = 1/g experts; k = n / sparsity must be an integer: g = 1/4 cannot have sparsity 8 or 16.
    assert {r["name"]: r["reason"] for r in plan.invalid} == {
        "tiny_g1-4_s8": "top_k = num_experts / sparsity = 4 / 8 = 1/2 is not a positive integer",
        "tiny_g1-4_s16": "top_k = num_experts / sparsity = 4 / 16 = 1/4 is not a positive integer",
        "tiny_g1-8_s16": "top_k = num_experts / sparsity = 8 / 16 = 1/2 is not a positive integer",
    }
    assert len(moe) == 12 - 3
    for r in moe:
        g, s = Fraction(r["granularity"]), Fraction(r["sparsity"])
        assert r["num_experts"] * g == 1 and r["top_k"] == r["num_experts"] / s
        # the dense model's total parameters (the routers are the only extra)
        assert r["total_params"] - _routers(r) == dense["total_params"] == r["dense_total_params"]
        assert r["active_params"] < dense["active_params"]
        # equal training FLOPs, up to half a step of the MoE
        assert abs(r["train_flops"] - dense_flops) <= r["flops_per_token"] * BATCH_TOKENS / 2
        assert r["tokens"] > dense["tokens"]
        # equal unique data: the MoE repeats it
        assert r["unique_tokens"] == dense["tokens"] == dense["unique_tokens"]
        assert r["data_repeat"] == r["tokens"] / dense["tokens"] > 1
        data = _config(out, r)["data"]
        assert data["token_budget"] == r["tokens"]
        assert data["repeat"] == {source: r["data_repeat"] for source in OLMOE_SOURCES}
        assert data["token_budget"] / data["repeat"]["dclm"] == pytest.approx(dense["tokens"], rel=1e-12)
        assert _config(out, r)["moe"]["require_flop_match"] is False
    dense_data = _config(out, dense)["data"]
    assert dense_data == {"token_budget": dense["tokens"]}
    half = next(r for r in moe if r["name"] == "tiny_g1-8_s4")  # 8 experts, top-2: a quarter of the FFN active
    assert (half["num_experts"], half["top_k"], half["flop_ratio"]) == (8, 2, "1/4")


def test_invalid_points_are_listed_with_reasons_and_get_no_config(tmp_path, capsys):
    arch = ARCH | {"ffn_hidden": 96}  # 96 / 64 = 1.5: granularity 1/64 has no integral width
    make_spec(tmp_path, scales=[{"name": "tiny", "arch": arch}], cluster={"ep_degree": 4},
              moe={"granularities": ["1", "2/3", "1/64"], "sparsities": [2, 4],
                   "heterogeneous": [[{"granularity": "1/2", "sparsity": 4, "share": "1/2"},
                                      {"granularity": "1/4", "sparsity": 4, "share": "1/4"}]]},
              seeds=[0, 1])
    out = tmp_path / "plan"
    assert cli.main(["plan", str(tmp_path / "spec.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    reasons = {r["name"]: r["reason"] for r in index["invalid"]}
    assert reasons == {
        "tiny_g1_s2": "num_experts 2 is not divisible by the target cluster's expert-parallel degree 4 (spec.cluster.ep_degree)",
        "tiny_g2-3_s2": "top_k = (1 - g_gen) / g = (1 - 0) / 2/3 = 3/2 is not a positive integer",
        "tiny_g2-3_s4": "top_k = (1 - g_gen) / g = (1 - 0) / 2/3 = 3/2 is not a positive integer",
        "tiny_g1-64_s2": "moe.expert_sets[0].granularity: granularity 1/64 x ffn_hidden 96 = 1.500 is not an integer "
                         "expert width; nearest valid granularities: 1/12 (hidden 8), or choose an "
                         "ffn_hidden divisible by 64",
        "tiny_g1-64_s4": reasons["tiny_g1-64_s2"],
        "tiny_het-g1-2s4w1-2+g1-4s4w1-4": "FLOP shares 1/2 + 1/4 = 3/4 must sum to 1 - generalist_granularity = 1",
    }
    assert all(r["points_skipped"] == 2 for r in index["invalid"])  # x 2 seeds
    assert index["summary"]["invalid_points"] == 12
    assert [r["name"] for r in index["points"]] == ["tiny_dense_seed0", "tiny_dense_seed1", "tiny_g1_s4_seed0", "tiny_g1_s4_seed1"]
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(r["name"] for r in index["points"])
    with open(out / "invalid.csv") as f:
        assert {r["name"]: r["reason"] for r in csv.DictReader(f)} == reasons
    assert "skipped 12 invalid points (6 designs)" in printed and "tiny_g2-3_s2: top_k" in printed


def test_replanning_keeps_finished_points_unless_their_config_changes(tmp_path):
    spec = make_spec(tmp_path)
    out = tmp_path / "plan"
    write_plan(build_plan(spec, out), out)
    (out / "points" / "tiny_dense" / ".done").write_text("{}")
    write_plan(build_plan(spec, out), out)  # same spec: fine
    changed = make_spec(tmp_path, learning_rates=[2e-3])
    with pytest.raises(ConfigError, match="tiny_dense .* already finished with a different run config") as info:
        write_plan(build_plan(changed, out), out)
    assert info.value.field == "--out"
    write_plan(build_plan(changed, out), out, force=True)
    assert "lr = 0.002" in (out / "points" / "tiny_dense" / "config.toml").read_text()


def test_mini_spec_plans_points_the_trainer_accepts_on_two_processes(tmp_path):
    from titan_moe.run_config.job_config import parse_run_config
    from titan_moe.run_config.preflight import plan_run

    out = tmp_path / "mini"
    plan = build_plan(load_spec(SPECS / "mini.yaml"), out)
    write_plan(plan, out)
    rows = [p.row for p in plan.points]
    assert [r["kind"] for r in rows] == ["dense", "moe", "moe", "moe"] and plan.invalid == []
    for row in rows:
        job = parse_run_config(["--job.config_file", str(out / row["config"])])
        plan = plan_run(job, world_size=2)
        args, mesh = plan.model_args, plan.mesh
        assert (mesh.world_size, mesh.ep) == (2, 2 if row["kind"] == "moe" else 1)
        assert args.dim <= 64 and args.n_layers == 2 and args.vocab_size == 50280
        assert job.training.seq_len == 64 and job.training.steps <= 60
        assert job.training.global_batch_size == job.training.local_batch_size * mesh.dp
        assert job.job.dump_folder == str(out / "points" / row["name"])


def test_budget_counts_all_active_params_or_a_fixed_token_budget(tmp_path):
    # params: active -> 20 x (45344 non-embedding + 384 x 32 embedding = 57632) tokens for every point of the scale
    plan = build_plan(make_spec(tmp_path, budget={"tokens_per_param": 20, "params": "active"}), tmp_path / "a")
    dense = next(p.row for p in plan.points if p.row["kind"] == "dense")
    assert dense["active_params"] == 45344 + 384 * 32 == 57632
    assert {p.row["steps"] for p in plan.points} == {math.ceil(20 * 57632 / BATCH_TOKENS)} == {9005}
    # a fixed budget in tokens, times each multiple, rounded up to whole steps
    plan = build_plan(make_spec(tmp_path, budget={"tokens": 1000, "multiples": [1, 3]}), tmp_path / "b")
    assert {(p.row["token_multiple"], p.row["steps"], p.row["tokens"]) for p in plan.points} == {
        (1.0, 8, 1024), (3.0, 24, 3072)}  # ceil(1000 / 128) = 8, ceil(3000 / 128) = 24


def test_megablocks_capacity_policy_reaches_the_run_config_and_the_point_name(tmp_path):
    routing = [{"mode": "capacity", "capacity_factor": 1.0, "capacity_policy": "megablocks"},
               {"mode": "capacity", "capacity_factor": 1.0}]
    out = tmp_path / "plan"
    plan = build_plan(make_spec(tmp_path, moe={"granularities": ["1"], "sparsities": [2], "routing": routing}), out)
    write_plan(plan, out)
    rows = {p.row["name"]: p.row for p in plan.points if p.row["kind"] == "moe"}
    assert sorted(rows) == ["tiny_g1_s2_cap1", "tiny_g1_s2_cap1_megablocks"]
    for name, policy in (("tiny_g1_s2_cap1", "priority"), ("tiny_g1_s2_cap1_megablocks", "megablocks")):
        moe = _config(out, rows[name])["moe"]
        assert (moe["routing"], moe["capacity_factor"], moe["capacity_policy"]) == ("capacity", 1.0, policy)
        assert rows[name]["capacity_policy"] == policy

"""Parameter/FLOP accounting equals the built module and the hand formula."""

import json

import pytest
import torch

from titan_moe import describe as describe_cli
from titan_moe.model import Transformer
from titan_moe.model.accounting import describe
from tests.model_configs import DENSE, GENERALIST, HETEROGENEOUS, HOMOGENEOUS, model_args

CONFIGS = {"dense": DENSE, "homogeneous": HOMOGENEOUS, "heterogeneous": HETEROGENEOUS, "generalist": GENERALIST}


def hand_counts(moe: dict | None):
    """Independent formula for the tiny ARCH (dim 32, 2 layers, 4 heads, ffn 64, vocab 300 -> 384)."""
    dim, layers, ffn, vocab = 32, 2, 64, 384
    attention = 4 * dim * dim + 2 * dim  # q,k,v,o + QK-norm weights over full q and k widths
    norms = 2 * dim
    total_ffn = active_ffn = 3 * dim * ffn
    if moe:
        total_ffn = active_ffn = 0
        for s in moe["expert_sets"]:
            g = eval(s["granularity"])  # "1/4" -> 0.25, test data only
            hidden = int(g * ffn)
            total_ffn += s["num_experts"] * 3 * dim * hidden + dim * s["num_experts"]
            active_ffn += s["top_k"] * 3 * dim * hidden + dim * s["num_experts"]
        gen = int(eval(moe.get("generalist_granularity", "0")) * ffn)
        total_ffn += 3 * dim * gen
        active_ffn += 3 * dim * gen
    per_layer_total = attention + norms + total_ffn
    per_layer_active = attention + norms + active_ffn
    embed = vocab * dim
    outer = embed + dim + vocab * dim  # embedding, final norm, lm head
    return layers * per_layer_total + outer, layers * per_layer_active + outer, embed


@pytest.mark.parametrize("name", CONFIGS)
def test_describe_matches_instantiated_module_and_hand_formula(name):
    args = model_args(CONFIGS[name])
    d = describe(args, seq_len=16)
    module_total = sum(p.numel() for p in Transformer(args).parameters())
    total, active, embed = hand_counts(CONFIGS[name])
    assert d["total_params"] == module_total == total
    assert d["active_params"] == active
    assert d["embedding_params"] == embed
    attention_flops = 12 * 2 * 4 * 8 * 16
    assert d["flops_per_token"] == 6 * (active - embed) + attention_flops


def test_flop_matched_moe_has_dense_active_ffn_params():
    dense = describe(model_args(DENSE))
    for moe in (HOMOGENEOUS, HETEROGENEOUS):
        d = describe(model_args(moe))
        assert d["flop_matched"] is True
        expert_and_generalist = d["expert_params_active"] + 2 * 3 * 32 * d["generalist_hidden_dim"]
        assert expert_and_generalist == d["dense_ffn_params_per_layer"] * 2  # 2 layers
        routers = 2 * 32 * sum(s["num_experts"] for s in moe["expert_sets"])
        assert d["active_params"] - routers == dense["active_params"]
    unmatched = describe(model_args(GENERALIST))  # 4 * 1/8 + 1/2 = 1
    assert unmatched["flop_matched"] is True
    over = describe(model_args({"enabled": True, "expert_sets": [{"num_experts": 8, "granularity": "1/4", "top_k": 8}]}))
    assert over["flop_matched"] is False and over["flop_ratio"] == "2"


def test_describe_cli_json_contract(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\nname = "titan_moe"\n[arch]\ndim = 64\nn_layers = 2\nn_heads = 4\nffn_hidden = 256\n'
        'vocab_size = 50280\n[moe]\nenabled = true\n'
        'expert_sets = [ { num_experts = 16, granularity = 0.25, top_k = 2 } ]\ngeneralist_granularity = "1/2"\n'
        '[training]\nseq_len = 128\n'
    )
    assert describe_cli.main([str(config), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["expert_sets"] == [{"num_experts": 16, "granularity": "1/4", "top_k": 2, "hidden_dim": 64, "sparsity": 8.0}]
    assert d["flop_matched"] is True
    assert d["embedding_params"] == 50304 * 64
    with torch.device("meta"):
        module_total = sum(p.numel() for p in Transformer(model_args(None)).parameters())
    assert module_total > 0
    assert d["total_params"] == d["active_params"] + 16 * 3 * 64 * 64 * 2 - 2 * 3 * 64 * 64 * 2


def test_describe_cli_reports_invalid_config(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[arch]\ndim = 64\nn_layers = 2\nn_heads = 4\nffn_hidden = 100\n[moe]\nenabled = true\n"
                      "expert_sets = [ { num_experts = 8, granularity = '1/8', top_k = 2 } ]\n")
    assert describe_cli.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "moe.expert_sets[0].granularity" in err and "12.500" in err

"""Every invalid design point fails before anything starts, naming the field."""

import pytest

from titan_moe.common.errors import ConfigError
from titan_moe.model.args import TitanMoEModelArgs
from tests.model_configs import ARCH

MOE = {"enabled": True, "expert_sets": [{"num_experts": 8, "granularity": "1/4", "top_k": 2}]}


def build(arch=None, moe=None, seq_len=16):
    return TitanMoEModelArgs.from_sections(ARCH | (arch or {}), moe, seq_len)


def moe_with(**changes):
    return MOE | changes


def set_with(**changes):
    return moe_with(expert_sets=[MOE["expert_sets"][0] | changes])


@pytest.mark.parametrize(
    "arch, moe, field, words",
    [
        ({}, set_with(granularity="1/3"), "moe.expert_sets[0].granularity", ["21.333", "nearest valid granularities: 1/4 (hidden 16), 3/8 (hidden 24)"]),
        ({}, moe_with(z_loss_normalization="layers"), "moe.z_loss_normalization", ["choose one of tokens, tokens_topk"]),
        ({}, set_with(top_k=9), "moe.expert_sets[0].top_k", ["exceeds num_experts 8"]),
        ({}, set_with(top_k=0), "moe.expert_sets[0].top_k", ["positive integer"]),
        ({}, set_with(num_experts=2.5), "moe.expert_sets[0].num_experts", ["positive integer"]),
        ({}, set_with(granularity="-1/4"), "moe.expert_sets[0].granularity", ["> 0"]),
        ({}, set_with(granularity="a quarter"), "moe.expert_sets[0].granularity", ["fraction like '1/8'"]),
        ({}, set_with(experts=4), "moe.expert_sets[0].experts", ["unknown key"]),
        ({}, moe_with(expert_sets=[{"granularity": "1/4", "top_k": 2}]), "moe.expert_sets[0].num_experts", ["required"]),
        ({}, moe_with(expert_sets=[]), "moe.expert_sets", ["at least one"]),
        ({}, moe_with(aux_loss_weight=-0.1), "moe.aux_loss_weight", [">= 0"]),
        ({}, moe_with(z_loss_weight=-1), "moe.z_loss_weight", [">= 0"]),
        ({}, moe_with(bias_update_rate=-0.001), "moe.bias_update_rate", [">= 0"]),
        ({}, moe_with(routing="token_choice"), "moe.routing", ["dropless", "capacity"]),
        ({}, moe_with(routing="capacity", capacity_factor=0), "moe.capacity_factor", ["> 0"]),
        ({}, moe_with(generalist_granularity="-1/2"), "moe.generalist_granularity", [">= 0"]),
        ({}, moe_with(generalist_granularity="1/3"), "moe.generalist_granularity", ["not an integer expert width"]),
        ({}, moe_with(require_flop_match=True, generalist_granularity="1/4"), "moe.require_flop_match",
         ["2*1/4 + 1/4 = 3/4", "== 1"]),
        ({}, moe_with(top_k_typo=1), "moe.top_k_typo", ["unknown key"]),
        ({"n_heads": 5}, None, "arch.n_heads", ["not divisible"]),
        ({"n_kv_heads": 3}, None, "arch.n_kv_heads", ["must divide"]),
        ({"dim": 0}, None, "arch.dim", ["positive integer"]),
        ({"hidden": 3}, None, "arch.hidden", ["unknown key"]),
        ({"head_dim": 7}, None, "arch.head_dim", ["even"]),
    ],
)
def test_invalid_config_names_the_field(arch, moe, field, words):
    with pytest.raises(ConfigError) as err:
        build(arch, moe)
    assert err.value.field == field
    for word in words:
        assert word in str(err.value)


def test_flop_matched_design_is_accepted_with_require_flop_match():
    args = build(moe=moe_with(require_flop_match=True, generalist_granularity="1/2"))
    assert args.moe.flop_ratio == 1


def test_float_granularity_is_read_as_a_fraction():
    args = build(moe=set_with(granularity=0.25))
    assert args.expert_hidden_dims() == [16]

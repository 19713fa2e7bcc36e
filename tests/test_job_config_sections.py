"""The run config's [arch]/[moe] sections are the model args' fields: declared once, defaults included.

``titan_moe.run_config.job_config`` holds the section dataclasses (what torchtitan's
parser reads); ``titan_moe.model.args`` subclasses them and only re-types the
granularities, so a field added to a section reaches the model with its default.
"""

from dataclasses import MISSING, fields
from fractions import Fraction

import pytest

from titan_moe.run_config import job_config
from titan_moe.model import config as model_config
from titan_moe.common.errors import ConfigError
from titan_moe.model.args import ExpertSetArgs, MoEArgs, TitanMoEModelArgs, parse_fraction


def _defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def test_model_args_are_the_sections_subclassed():
    assert issubclass(TitanMoEModelArgs, model_config.ArchConfig)
    assert issubclass(MoEArgs, model_config.MoEConfig)
    assert issubclass(ExpertSetArgs, model_config.ExpertSetConfig)
    # Only what the model adds: the sequence length and the typed [moe].
    arch = {f.name for f in fields(model_config.ArchConfig)}
    assert {f.name for f in fields(TitanMoEModelArgs)} - arch == {"max_seq_len", "moe"}
    assert {f.name for f in fields(MoEArgs)} == {f.name for f in fields(model_config.MoEConfig)}


def test_defaults_agree_once_granularities_are_fractions():
    model = _defaults(TitanMoEModelArgs)
    for name in ("moe", "max_seq_len"):
        model.pop(name)
    assert _defaults(model_config.ArchConfig) == model
    section = _defaults(model_config.MoEConfig)
    section["generalist_granularity"] = parse_fraction(section["generalist_granularity"], "g")
    assert section == _defaults(MoEArgs)
    assert parse_fraction(model_config.ExpertSetConfig().granularity, "g") == Fraction(1)
    # The built args carry the section's values, not a second set of defaults.
    args = TitanMoEModelArgs.from_config(model_config.ArchConfig(dim=64), model_config.MoEConfig(capacity_policy="megablocks"), 32)
    assert (args.dim, args.n_heads, args.max_seq_len, args.moe.capacity_policy) == (64, 4, 32, "megablocks")


def test_decimal_granularities_snap_like_numbers():
    sets = [{"num_experts": 6, "granularity": 0.3333333333333333, "top_k": 3}]
    args = TitanMoEModelArgs.from_sections({"ffn_hidden": 96}, {"enabled": True, "expert_sets": sets}, 16)
    assert args.moe.expert_sets[0].granularity == Fraction(1, 3)


@pytest.mark.parametrize(
    "arch, moe, field",
    [
        ({"dimm": 4}, {}, "arch.dimm"),
        ({}, {"expert_sets": [{"num_experts": 4}]}, "moe.expert_sets[0].top_k"),
        ({}, {"expert_sets": {"num_experts": 4}}, "moe.expert_sets"),
        ({}, {"expert_sets": [3]}, "moe.expert_sets[0]"),
    ],
)
def test_section_tables_are_checked_by_name(arch, moe, field):
    with pytest.raises(ConfigError) as err:
        TitanMoEModelArgs.from_sections(arch, moe, 16)
    assert err.value.field == field


@pytest.mark.parametrize("where", ["toml", "override"])
def test_model_flavor_is_refused_with_the_fix(tmp_path, where):
    """titan-moe has no flavor presets: a flavor would be silently ignored, so it is refused."""
    from tests.distributed_utils import config

    text = open(config("tiny_dense")).read()
    overrides = []
    if where == "toml":
        text = text.replace('name = "titan_moe"', 'name = "titan_moe"\nflavor = "tiny"')
    else:
        overrides = ["--model.flavor", "tiny"]
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        job_config.load_run_config(path, overrides)
    assert str(err.value).startswith("model.flavor: 'tiny' would be ignored")
    assert "builds the model from [arch] and [moe]" in str(err.value) and "delete the key" in str(err.value)
    assert job_config.load_run_config(config("tiny_dense")).model.name == "titan_moe"  # the shipped configs pass

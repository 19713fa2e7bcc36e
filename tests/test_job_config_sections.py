"""The run config's [arch]/[moe] sections and the model's args declare the same keys and defaults.

torchtitan's config parser needs its own dataclasses for these sections
(``titan_moe.job_config``); this keeps them from drifting away from
``titan_moe.model.args``, the single place that validates a design point.
"""

from dataclasses import MISSING, fields
from fractions import Fraction

from titan_moe import job_config
from titan_moe.model.args import MoEArgs, TitanMoEModelArgs, parse_fraction


def _defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def test_arch_section_matches_model_args():
    model = _defaults(TitanMoEModelArgs)
    for name in ("moe", "max_seq_len", "_enforced"):
        model.pop(name)
    assert _defaults(job_config.Arch) == model


def test_moe_section_matches_moe_args():
    section = _defaults(job_config.MoE)
    model = _defaults(MoEArgs)
    assert set(section) == set(model)
    section["generalist_granularity"] = parse_fraction(section["generalist_granularity"], "g")
    assert section == model
    assert {f.name for f in fields(job_config.ExpertSet)} == {"num_experts", "granularity", "top_k"}
    assert parse_fraction(job_config.ExpertSet().granularity, "g") == Fraction(1)

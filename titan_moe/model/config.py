"""The model's own run-config sections, ``[arch]`` and ``[moe]``, and the table reader.

These dataclasses hold every field, default and meaning of the two sections
that describe a model; ``titan_moe.run_config.job_config`` composes them into the run
config, and ``titan_moe.model.args`` subclasses them into validated model args.
They live in the model package so that the model depends on nothing but its
own config and the error types: importing ``titan_moe.model`` loads neither
torchtitan's config machinery nor the data layer (tests/test_import_cycles.py).

No ``from __future__ import annotations``: torchtitan's ConfigManager inspects
field types at runtime (``dataclasses.is_dataclass(field.type)``) to merge sections.
"""

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from titan_moe.common.errors import ConfigError


@dataclass
class ArchConfig:
    """The ``[arch]`` section: an OLMoE-like decoder's shape (see titan_moe.model.args)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """None: as many KV heads as query heads."""
    head_dim: int | None = None
    """None: dim // n_heads."""
    ffn_hidden: int = 1024
    """Dense SwiGLU hidden size d_ff; an expert of granularity g has g * d_ff."""
    vocab_size: int = 50280
    """Padded up to a multiple of 128 inside the model."""
    qk_norm: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class ExpertSetConfig:
    """One ``(n, g, k)`` expert set of ``[moe].expert_sets``: n experts of granularity g, top-k routing.

    ``num_experts`` and ``top_k`` must be written (``EXPERT_SET_REQUIRED``); the
    defaults below only let torchtitan's CLI parser build an empty instance."""

    num_experts: int = 8
    granularity: str = "1"
    """A fraction of ffn_hidden, written "1/8", "0.125" (or the TOML number 0.125) or "1"."""
    top_k: int = 1


EXPERT_SET_REQUIRED = ("num_experts", "top_k")


@dataclass
class MoEConfig:
    """The ``[moe]`` section: the MoE design point (validated by titan_moe.model.args)."""

    enabled: bool = False
    """False builds the dense baseline of the same [arch]."""
    expert_sets: list[ExpertSetConfig] = field(default_factory=list)
    """Expert sets whose outputs add: [{num_experts = 64, granularity = "1/8", top_k = 8}]."""
    generalist_granularity: str = "0"
    """Granularity of the always-active generalist (shared) expert; "0" for none."""
    require_flop_match: bool = False
    """Refuse designs with sum_i top_k_i * granularity_i + generalist_granularity != 1."""
    routing: str = "dropless"
    """"dropless" or "capacity"."""
    capacity_factor: float = 1.25
    """Under routing = "capacity": slots per expert = ceil(capacity_factor * tokens * k / n) on the
    rank's tokens ("priority"), or int(capacity_factor * k * tokens * ep / n) over the EP group ("megablocks")."""
    capacity_policy: str = "priority"
    """Which slots a full expert drops under routing = "capacity": "priority" keeps the
    highest-probability slots of the local batch; "megablocks" keeps slots in token order
    with capacity computed over the expert-parallel group (the papers' baseline)."""
    renormalize: bool = False
    """Rescale the selected router probabilities to sum to 1 (OLMoE keeps them raw)."""
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    z_loss_normalization: str = "tokens"
    """"tokens" (sum_t lse^2 / T) or "tokens_topk" (/ (T * k), megablocks/OLMoE)."""
    bias_update_rate: float = 0.0
    """Loss-free balancing step size gamma; 0 turns it off."""
    expert_impl: str = "auto"
    """"auto" (grouped GEMM on Hopper, loop elsewhere), "grouped" or "loop"."""



# -- dict -> section ------------------------------------------------------------------


def section_from_dict(cls: type, data: Any, name: str) -> Any:
    """Build section dataclass ``cls`` from its TOML table; ConfigError naming ``name.key``.

    Refuses unknown keys (typos) and missing required expert-set keys, and reads
    two spellings torchtitan's loader cannot: a number where a string is declared
    (``granularity = 0.25``) and a list of tables for a list-of-dataclass field
    (``expert_sets = [{...}]``).  Nested dataclass sections are built recursively.
    """
    if not isinstance(data, dict):
        raise ConfigError(name, f"must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown key; valid keys: {', '.join(sorted(known))}")
    if cls is ExpertSetConfig:
        for key in EXPERT_SET_REQUIRED:
            if key not in data:
                raise ConfigError(f"{name}.{key}", "is required")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if is_dataclass(kind) and isinstance(value, dict):
            value = section_from_dict(kind, value, f"{name}.{key}")
        elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        elif typing.get_origin(kind) is list and is_dataclass((typing.get_args(kind) or (None,))[0]):
            if not isinstance(value, list):
                raise ConfigError(f"{name}.{key}", "must be a list of tables like { num_experts = 64, "
                                  "granularity = '1/8', top_k = 8 }")
            (item,) = typing.get_args(kind)
            value = [section_from_dict(item, v, f"{name}.{key}[{i}]") for i, v in enumerate(value)]
        values[key] = value
    return cls(**values)



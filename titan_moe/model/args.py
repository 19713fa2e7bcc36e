"""Typed model configuration: the `[arch]` and `[moe]` sections of a run config.

Notation follows "Slicing and Dicing: Configuring Optimal Mixtures of Experts":
an expert *set* ``(n, g, k)`` holds ``n`` experts of granularity ``g`` (hidden
size ``g * ffn_hidden``) and routes each token to its top ``k``; a layer may hold
several sets whose outputs add, plus an always-active *generalist* expert of
granularity ``g_gen``.  A design is FLOP-matched with the dense model when
``sum_i k_i * g_i + g_gen == 1``.

The run config's section dataclasses (``titan_moe.model.config.ArchConfig``,
``MoEConfig``, ``ExpertSetConfig``) hold every field and default; the classes
here subclass them, only reading granularities into exact fractions and adding
``[training].seq_len``.  Everything is validated here, before any process group
starts, and every error names the field it is about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any

from titan_moe.common.errors import ConfigError
from titan_moe.model.config import EXPERT_SET_REQUIRED, ArchConfig, ExpertSetConfig, MoEConfig, section_from_dict

VOCAB_PAD_MULTIPLE = 128
ROUTING_MODES = ("dropless", "capacity")
CAPACITY_POLICIES = ("priority", "megablocks")
EXPERT_IMPLS = ("auto", "grouped", "loop")
Z_LOSS_NORMALIZATIONS = ("tokens", "tokens_topk")
# Expert widths that are a multiple of this fill the GPU grouped GEMM's 16-byte rows
# (8 bf16 values); other integral widths run, zero-padded up to it (see experts.py).
EXPERT_WIDTH_ALIGN = 8


def parse_fraction(value: Any, field_name: str) -> Fraction:
    """Read a granularity written as "1/8", 0.125 or 1."""
    if isinstance(value, bool):
        raise ConfigError(field_name, f"expected a number or a fraction like '1/8', got {value!r}")
    try:
        if isinstance(value, float) or (isinstance(value, str) and "." in value):
            # 0.125 is exact in binary; 0.1 and 0.3333333333333333 are not, so snap to a
            # small denominator (TOML numbers reach here as decimal strings, see job_config).
            return Fraction(value).limit_denominator(1 << 12)
        return Fraction(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ConfigError(field_name, f"expected a number or a fraction like '1/8', got {value!r}") from None


def format_fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def expert_hidden_dim(granularity: Fraction, ffn_hidden: int, field_name: str) -> int:
    """Hidden size of an expert of this granularity; refuses non-integral widths."""
    width = granularity * ffn_hidden
    if width.denominator == 1:
        return int(width)
    # Suggest the nearest widths the GPU grouped GEMM takes without padding.
    align = EXPERT_WIDTH_ALIGN
    lower, upper = math.floor(width / align) * align, math.ceil(width / align) * align
    nearest = ", ".join(
        f"{format_fraction(Fraction(w, ffn_hidden))} (hidden {w})" for w in (lower, upper) if w > 0
    )
    raise ConfigError(
        field_name,
        f"granularity {format_fraction(granularity)} x ffn_hidden {ffn_hidden} = {float(width):.3f} "
        f"is not an integer expert width; nearest valid granularities: {nearest}, "
        f"or choose an ffn_hidden divisible by {granularity.denominator}",
    )


@dataclass
class ExpertSetArgs(ExpertSetConfig):
    """``num_experts`` experts of ``granularity`` x ffn_hidden, each token routed to ``top_k``.

    The ``[moe].expert_sets`` entry (``ExpertSetConfig``) with the granularity read
    into an exact fraction."""

    granularity: Fraction = Fraction(1)

    @property
    def sparsity(self) -> Fraction:
        """Total over active experts of this set, ``n / k``."""
        return Fraction(self.num_experts, self.top_k)


@dataclass
class MoEArgs(MoEConfig):
    """The ``[moe]`` section (``MoEConfig``: fields, defaults and their meaning) with the
    granularities read into exact fractions.  ``enabled = false`` builds the dense baseline."""

    expert_sets: list[ExpertSetArgs] = field(default_factory=list)
    generalist_granularity: Fraction = Fraction(0)

    @classmethod
    def from_config(cls, config: MoEConfig) -> "MoEArgs":
        sets = []
        for i, s in enumerate(config.expert_sets):
            name = f"moe.expert_sets[{i}]"
            for key in EXPERT_SET_REQUIRED:
                _require_positive_int(getattr(s, key), f"{name}.{key}")
            sets.append(ExpertSetArgs(num_experts=s.num_experts, top_k=s.top_k,
                                      granularity=parse_fraction(s.granularity, f"{name}.granularity")))
        values = {f.name: getattr(config, f.name) for f in fields(MoEConfig)}
        values["expert_sets"] = sets
        values["generalist_granularity"] = parse_fraction(config.generalist_granularity, "moe.generalist_granularity")
        return cls(**values)

    @property
    def flop_ratio(self) -> Fraction:
        """``sum_i k_i g_i + g_gen``: active FFN compute relative to the dense FFN."""
        if not self.enabled:
            return Fraction(1)
        return sum((s.top_k * s.granularity for s in self.expert_sets), Fraction(0)) + self.generalist_granularity


@dataclass
class TitanMoEModelArgs(ArchConfig):
    """An OLMoE-like decoder: pre-norm RMSNorm, RoPE, QK-norm, SwiGLU, no biases.

    The ``[arch]`` section (``ArchConfig``: fields and defaults) plus the sequence
    length and the ``[moe]`` design point, validated.  Build it from a parsed run
    config (``from_job_config``) or from plain section tables (``from_sections``,
    for the sweep planner); both go through the same section dataclasses.
    """

    max_seq_len: int = 2048
    """Always set from ``[training].seq_len`` by the constructors below."""
    moe: MoEArgs = field(default_factory=MoEArgs)

    # -- derived sizes -------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        # Embedding rows rounded up so matmuls tile well (50280 -> 50304).
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def expert_hidden_dims(self) -> list[int]:
        return [
            expert_hidden_dim(s.granularity, self.ffn_hidden, f"moe.expert_sets[{i}].granularity")
            for i, s in enumerate(self.moe.expert_sets)
        ]

    def generalist_hidden_dim(self) -> int:
        return expert_hidden_dim(self.moe.generalist_granularity, self.ffn_hidden, "moe.generalist_granularity")

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_config(cls, arch: ArchConfig, moe: MoEConfig, seq_len: int) -> "TitanMoEModelArgs":
        """Build and validate from the parsed ``[arch]`` and ``[moe]`` sections and ``[training].seq_len``."""
        values = {f.name: getattr(arch, f.name) for f in fields(ArchConfig)}
        args = cls(**values, max_seq_len=seq_len, moe=MoEArgs.from_config(moe))
        args.validate()
        return args

    @classmethod
    def from_job_config(cls, job_config: Any) -> "TitanMoEModelArgs":
        """The model a run config (``titan_moe.run_config.job_config.load_run_config``) builds."""
        return cls.from_config(job_config.arch, job_config.moe, job_config.training.seq_len)

    @classmethod
    def from_sections(cls, arch: dict[str, Any], moe: dict[str, Any] | None, seq_len: int) -> "TitanMoEModelArgs":
        """Build and validate from the TOML tables ``[arch]``, ``[moe]`` and ``[training].seq_len``."""
        return cls.from_config(section_from_dict(ArchConfig, arch, "arch"),
                               section_from_dict(MoEConfig, moe or {}, "moe"), seq_len)

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
            _require_positive_int(getattr(self, name), f"arch.{name}" if name != "max_seq_len" else "training.seq_len")
        if self.n_kv_heads is not None:
            _require_positive_int(self.n_kv_heads, "arch.n_kv_heads")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError("arch.n_kv_heads", f"{self.n_kv_heads} must divide n_heads {self.n_heads}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError("arch.n_heads", f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set arch.head_dim")
        if self.head_dim is not None:
            _require_positive_int(self.head_dim, "arch.head_dim")
        if self.attn_head_dim % 2:
            raise ConfigError("arch.head_dim", f"head_dim {self.attn_head_dim} must be even for rotary embeddings")
        if self.norm_eps <= 0:
            raise ConfigError("arch.norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.moe.enabled:
            _validate_moe(self)


def _require_positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


def _validate_moe(args: TitanMoEModelArgs) -> None:
    moe = args.moe
    if not moe.expert_sets:
        raise ConfigError("moe.expert_sets", "enabled = true needs at least one expert set")
    for i, s in enumerate(moe.expert_sets):
        name = f"moe.expert_sets[{i}]"
        if s.granularity <= 0:
            raise ConfigError(f"{name}.granularity", f"must be > 0, got {format_fraction(s.granularity)}")
        if s.top_k > s.num_experts:
            raise ConfigError(f"{name}.top_k", f"top_k {s.top_k} exceeds num_experts {s.num_experts}")
    if moe.generalist_granularity < 0:
        raise ConfigError("moe.generalist_granularity", f"must be >= 0, got {format_fraction(moe.generalist_granularity)}")
    args.expert_hidden_dims()  # raises on non-integral widths, naming the set
    args.generalist_hidden_dim()
    if moe.routing not in ROUTING_MODES:
        raise ConfigError("moe.routing", f"unknown routing {moe.routing!r}; choose one of {', '.join(ROUTING_MODES)}")
    if moe.capacity_policy not in CAPACITY_POLICIES:
        raise ConfigError(
            "moe.capacity_policy", f"unknown {moe.capacity_policy!r}; choose one of {', '.join(CAPACITY_POLICIES)}"
        )
    if moe.z_loss_normalization not in Z_LOSS_NORMALIZATIONS:
        raise ConfigError(
            "moe.z_loss_normalization",
            f"unknown {moe.z_loss_normalization!r}; choose one of {', '.join(Z_LOSS_NORMALIZATIONS)}",
        )
    if moe.expert_impl not in EXPERT_IMPLS:
        raise ConfigError("moe.expert_impl", f"unknown {moe.expert_impl!r}; choose one of {', '.join(EXPERT_IMPLS)}")
    if not moe.capacity_factor > 0:
        raise ConfigError("moe.capacity_factor", f"must be > 0, got {moe.capacity_factor}")
    for name in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
        value = getattr(moe, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or math.isnan(value):
            raise ConfigError(f"moe.{name}", f"must be a number >= 0, got {value!r}")
    if moe.require_flop_match and moe.flop_ratio != 1:
        terms = " + ".join(f"{s.top_k}*{format_fraction(s.granularity)}" for s in moe.expert_sets)
        raise ConfigError(
            "moe.require_flop_match",
            f"FLOP matching needs sum_i top_k_i * granularity_i + generalist_granularity == 1, "
            f"but {terms} + {format_fraction(moe.generalist_granularity)} = {format_fraction(moe.flop_ratio)}",
        )

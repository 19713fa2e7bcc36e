"""Typed model configuration: the `[arch]` and `[moe]` sections of a run config.

Notation follows "Slicing and Dicing: Configuring Optimal Mixtures of Experts":
an expert *set* ``(n, g, k)`` holds ``n`` experts of granularity ``g`` (hidden
size ``g * ffn_hidden``) and routes each token to its top ``k``; a layer may hold
several sets whose outputs add, plus an always-active *generalist* expert of
granularity ``g_gen``.  A design is FLOP-matched with the dense model when
``sum_i k_i * g_i + g_gen == 1``.

Everything is validated here, before any process group starts, and every
error names the field it is about.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from torchtitan.protocols.model import BaseModelArgs

from titan_moe.errors import ConfigError

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
        if isinstance(value, float):
            # 0.125 is exact in binary; 0.1 is not, so snap to a small denominator.
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
class ExpertSetArgs:
    """``num_experts`` experts of ``granularity`` x ffn_hidden, each token routed to ``top_k``."""

    num_experts: int
    granularity: Fraction
    top_k: int

    @property
    def sparsity(self) -> Fraction:
        """Total over active experts of this set, ``n / k``."""
        return Fraction(self.num_experts, self.top_k)


@dataclass
class MoEArgs:
    """The `[moe]` section.  ``enabled = false`` builds the dense baseline."""

    enabled: bool = False
    expert_sets: list[ExpertSetArgs] = field(default_factory=list)
    # Always-active generalist (shared) expert; 0 means none.
    generalist_granularity: Fraction = Fraction(0)
    require_flop_match: bool = False
    routing: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    # Which slots a full expert drops under routing = "capacity": "priority" keeps the
    # highest-probability slots of the local batch; "megablocks" keeps slots in token
    # order with capacity computed over the expert-parallel group (the papers' baseline).
    capacity_policy: Literal["priority", "megablocks"] = "priority"
    # Keep the selected router probabilities as they are (OLMoE) or rescale them to sum to 1.
    renormalize: bool = False
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    # z-loss per set: "tokens" = sum_t lse_t^2 / T; "tokens_topk" = sum_t lse_t^2 / (T * k),
    # the normalisation of megablocks' z-loss that OLMoE trained with.
    z_loss_normalization: Literal["tokens", "tokens_topk"] = "tokens"
    # Loss-free balancing: per-expert selection bias step size; 0 turns it off.
    bias_update_rate: float = 0.0
    # "auto": torch._grouped_mm on Hopper GPUs, a per-expert loop elsewhere.
    expert_impl: Literal["auto", "grouped", "loop"] = "auto"

    @property
    def flop_ratio(self) -> Fraction:
        """``sum_i k_i g_i + g_gen``: active FFN compute relative to the dense FFN."""
        if not self.enabled:
            return Fraction(1)
        return sum((s.top_k * s.granularity for s in self.expert_sets), Fraction(0)) + self.generalist_granularity


@dataclass
class TitanMoEModelArgs(BaseModelArgs):
    """An OLMoE-like decoder: pre-norm RMSNorm, RoPE, QK-norm, SwiGLU, no biases."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden: int = 1024
    vocab_size: int = 50280
    qk_norm: bool = True
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
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
    def from_sections(cls, arch: dict[str, Any], moe: dict[str, Any] | None, seq_len: int) -> "TitanMoEModelArgs":
        """Build and validate from the TOML sections `[arch]`, `[moe]` and `[training].seq_len`."""
        arch = dict(arch)
        known = {f.name for f in fields(cls)} - {"moe", "max_seq_len", "_enforced"}
        for key in arch:
            if key not in known:
                raise ConfigError(f"arch.{key}", f"unknown key; valid keys: {', '.join(sorted(known))}")
        args = cls(**arch, max_seq_len=seq_len, moe=_moe_from_section(moe or {}))
        args.validate()
        return args

    @classmethod
    def from_toml(cls, path: str | Path) -> "TitanMoEModelArgs":
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        if "arch" not in doc:
            raise ConfigError("arch", f"{path} has no [arch] section")
        seq_len = doc.get("training", {}).get("seq_len", 2048)
        return cls.from_sections(doc["arch"], doc.get("moe"), seq_len)

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

    # -- torchtitan's BaseModelArgs protocol ---------------------------------
    def update_from_config(self, job_config, **kwargs) -> None:
        self.max_seq_len = job_config.training.seq_len
        self.validate()

    def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
        from titan_moe.model.accounting import count_parameters, flops_per_token

        counts = count_parameters(model)
        return counts.total, flops_per_token(self, counts, seq_len)


def _require_positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


def _moe_from_section(section: dict[str, Any]) -> MoEArgs:
    section = dict(section)
    known = {f.name for f in fields(MoEArgs)}
    for key in section:
        if key not in known:
            raise ConfigError(f"moe.{key}", f"unknown key; valid keys: {', '.join(sorted(known))}")
    raw_sets = section.pop("expert_sets", [])
    if not isinstance(raw_sets, list):
        raise ConfigError("moe.expert_sets", "must be a list of tables like { num_experts = 64, granularity = '1/8', top_k = 8 }")
    sets = []
    for i, raw in enumerate(raw_sets):
        name = f"moe.expert_sets[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(name, f"must be a table, got {raw!r}")
        extra = set(raw) - {"num_experts", "granularity", "top_k"}
        if extra:
            raise ConfigError(f"{name}.{sorted(extra)[0]}", "unknown key; valid keys: granularity, num_experts, top_k")
        for key in ("num_experts", "top_k"):
            if key not in raw:
                raise ConfigError(f"{name}.{key}", "is required")
            _require_positive_int(raw[key], f"{name}.{key}")
        sets.append(
            ExpertSetArgs(
                num_experts=raw["num_experts"],
                granularity=parse_fraction(raw.get("granularity", 1), f"{name}.granularity"),
                top_k=raw["top_k"],
            )
        )
    if "generalist_granularity" in section:
        section["generalist_granularity"] = parse_fraction(section["generalist_granularity"], "moe.generalist_granularity")
    return MoEArgs(expert_sets=sets, **section)


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

"""From the spec's axes to expert sets: the top-k and expert-count rules.

Notation (Slicing and Dicing): an expert set ``(n, g, k)`` has ``n`` experts of
hidden size ``g * ffn_hidden`` and routes each token to ``k`` of them; its
sparsity is ``s = n / k``; ``g_gen`` is the always-active generalist expert.

FLOP matching (``matching: flop``, the paper's main setting)
    The MoE spends the dense model's FFN compute per token:
    ``sum_i k_i * g_i + g_gen = 1``.  A homogeneous design ``(g, s)`` gets
    ``k = (1 - g_gen) / g`` and ``n = s * k``.  A heterogeneous design gives
    set ``i`` a FLOP share ``f_i`` (default: ``1 - g_gen`` split equally;
    explicit shares must sum to ``1 - g_gen``): ``k_i = f_i / g_i``,
    ``n_i = s_i * k_i``.

Equal resources (``matching: equal_resources``, "Can Mixture-of-Experts Surpass
Dense LLMs Under Strictly Equal Resources?")
    The MoE has the dense model's *total* parameters: it keeps the dense
    model's attention, embeddings and depth and splits the dense FFN into
    experts, so ``sum_i n_i * g_i + g_gen = 1``.  A homogeneous design
    ``(g, s)`` gets ``n = (1 - g_gen) / g`` and ``k = n / s`` (activation rate
    ``1 / s``); a heterogeneous one gives set ``i`` a parameter share ``p_i``:
    ``n_i = p_i / g_i``, ``k_i = n_i / s_i``.  Totals then equal the dense
    model's up to the routers (``n_i * dim`` per layer), which the index
    reports.  (We pick the MoE to match a given dense model, not the dense
    shape to match an MoE.)

A design whose ``k`` or ``n`` is not an integer is *invalid*: it is reported
with the rule and the numbers and skipped, never rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from fractions import Fraction
from itertools import product
from typing import Any

from jobs.sweep import fields
from jobs.sweep.spec import DesignSpec, RoutingSpec, SetRequest, SweepSpec
from titan_moe.model.args import format_fraction as ff


class InvalidDesign(ValueError):
    """A design point the rules cannot realise; the message says which rule and why."""


@dataclass(frozen=True)
class DesignExpertSet:
    """One resolved ``(n, g, k)`` set of a design; ``section()`` is its ``[moe].expert_sets`` table."""

    num_experts: int
    granularity: Fraction
    top_k: int

    def section(self) -> dict:
        return {"num_experts": self.num_experts, "granularity": ff(self.granularity), "top_k": self.top_k}


@dataclass
class Design:
    """One MoE design point (before it meets a scale, a learning rate and a seed)."""

    requests: list[SetRequest]
    heterogeneous: bool
    generalist: Fraction
    routing: RoutingSpec
    sets: list[DesignExpertSet] | None = None
    invalid: str | None = None

    @property
    def granularity_label(self) -> str:
        return "+".join(ff(r.granularity) for r in self.requests)

    @property
    def sparsity_label(self) -> str:
        return "+".join(ff(r.sparsity) for r in self.requests)

    @property
    def sparsity(self) -> Fraction:
        """Expert parameters over active expert parameters, sum n_i g_i / sum k_i g_i (the
        generalist left out): a homogeneous design's s, a heterogeneous one's overall s."""
        assert self.sets, "a resolved (valid) design"
        return (sum(s.num_experts * s.granularity for s in self.sets)
                / sum(s.top_k * s.granularity for s in self.sets))


def _shares(requests: list[SetRequest], generalist: Fraction, what: str) -> list[Fraction]:
    budget = 1 - generalist
    if requests[0].share is None:
        return [budget / len(requests)] * len(requests)
    shares = [r.share for r in requests]
    if sum(shares) != budget:
        raise InvalidDesign(
            f"{what} shares {' + '.join(ff(s) for s in shares)} = {ff(sum(shares))} must sum to "
            f"1 - generalist_granularity = {ff(budget)}"
        )
    return shares


def _integer(value: Fraction, message: str) -> int:
    if value.denominator != 1 or value < 1:
        raise InvalidDesign(f"{message} = {ff(value)} is not a positive integer")
    return int(value)


def resolve_sets(requests: list[SetRequest], generalist: Fraction, matching: str) -> list[DesignExpertSet]:
    """The expert sets of a design under the matching rule; InvalidDesign when not integral."""
    sets = []
    if matching == "flop":
        shares = _shares(requests, generalist, "FLOP")
        for i, (r, share) in enumerate(zip(requests, shares)):
            where = f"set {i}: " if len(requests) > 1 else ""
            if len(requests) == 1:
                rule = f"{where}top_k = (1 - g_gen) / g = (1 - {ff(generalist)}) / {ff(r.granularity)}"
            else:
                rule = f"{where}top_k = share / g = {ff(share)} / {ff(r.granularity)}"
            k = _integer(share / r.granularity, rule)
            n = _integer(r.sparsity * k, f"{where}num_experts = sparsity x top_k = {ff(r.sparsity)} x {k}")
            sets.append(DesignExpertSet(n, r.granularity, k))
    else:
        shares = _shares(requests, generalist, "parameter")
        for i, (r, share) in enumerate(zip(requests, shares)):
            where = f"set {i}: " if len(requests) > 1 else ""
            if len(requests) == 1:
                rule = f"{where}num_experts = (1 - g_gen) / g = (1 - {ff(generalist)}) / {ff(r.granularity)}"
            else:
                rule = f"{where}num_experts = share / g = {ff(share)} / {ff(r.granularity)}"
            n = _integer(share / r.granularity, rule)
            k = _integer(Fraction(n) / r.sparsity, f"{where}top_k = num_experts / sparsity = {n} / {ff(r.sparsity)}")
            sets.append(DesignExpertSet(n, r.granularity, k))
    return sets


def enumerate_designs(spec: SweepSpec) -> list[Design]:
    """Every MoE design of the spec, in axis order (the first value of each axis first)."""
    d: DesignSpec = spec.moe
    combos: list[tuple[list[SetRequest], bool]] = [
        ([SetRequest(g, s)], False) for g, s in product(d.granularities, d.sparsities)
    ]
    combos += [(list(c), True) for c in d.heterogeneous]
    designs = []
    for g_gen, (requests, hetero), routing in product(d.generalist_granularities, combos, d.routing):
        design = Design(requests, hetero, g_gen, routing)
        try:
            design.sets = resolve_sets(requests, g_gen, spec.matching)
        except InvalidDesign as exc:
            design.invalid = str(exc)
        designs.append(design)
    return designs


def structure_section(design: Design, spec: SweepSpec) -> dict:
    """The ``[moe]`` keys the design maths sets: what decides the parameter and FLOP counts."""
    return {
        "enabled": True,
        "expert_sets": [s.section() for s in design.sets or []],
        "generalist_granularity": ff(design.generalist),
        # The planner promises FLOP matching; let the model refuse a config that breaks it.
        "require_flop_match": spec.matching == "flop",
    }


def moe_section(design: Design, spec: SweepSpec, axis_values: dict[str, Any] | None = None) -> dict:
    """The ``[moe]`` table of a design's run config, generated from the schema's fields.

    The design's own keys, then every other ``MoEConfig`` field at its value: the routing
    entry's (``routing`` and, for token dropping, ``capacity_factor``/``capacity_policy``),
    a swept ``axes: {moe.<field>: ...}`` value, a fixed ``run.moe.<field>``, else the
    schema's default, so every point's table states every knob it trains with."""
    fixed = spec.run.get("moe", {})
    swept = {path.split(".", 1)[1]: v for path, v in (axis_values or {}).items() if path.startswith("moe.")}
    routing = {"routing": design.routing.mode}
    if design.routing.mode == "capacity":
        routing["capacity_factor"] = design.routing.capacity_factor
        routing["capacity_policy"] = design.routing.capacity_policy
    section = structure_section(design, spec)
    for f in dataclass_fields(fields.moe_schema()):
        if f.name in section:
            continue
        if f.name in fields.ROUTING_OWNED_MOE:
            if f.name in routing:
                section[f.name] = routing[f.name]
        elif f.name in swept:
            section[f.name] = swept[f.name]
        elif f.name in fixed:
            section[f.name] = fixed[f.name]
        else:
            section[f.name] = fields.default(f)
    return section

"""The sweep spec: a YAML file naming the axes of a design-space study.

A spec is read (``jobs.sweep.spec_file.load_spec``) in three steps: ``extends``
chains are deep-merged (the child wins, lists are replaced), ``--set
key.path=value`` overrides are applied, and the result is checked
(``jobs.sweep.spec_check.parse_spec``) into the typed dataclasses below, which
this module only declares.  Every mistake raises ``ConfigError`` naming the field
(``spec.moe.granularities[2]``) and the fix; nothing is planned from a spec
that fails.

Example (see ``jobs/specs/`` for the paper's study)::

    name: main_grid
    matching: flop              # flop | equal_resources
    cluster: {ep_degree: 8, nodes: 8, gpus_per_node: 8, mfu: 0.35, peak_tflops: 989, local_nproc: 2}
    budget: {tokens_per_param: 20, basis: dense, multiples: [1]}
    schedule: {warmup_fraction: 0.02}
    scales:
      - {name: s100m, arch: {dim: 768, n_layers: 12, n_heads: 12, ffn_hidden: 3072, vocab_size: 50280}}
    moe:
      granularities: ["1", "1/2", "1/4", "1/8"]
      sparsities: [1, 8, 64]
      heterogeneous:            # optional: combinations of several expert sets
        - [{granularity: "1/2", sparsity: 8}, {granularity: "1/8", sparsity: 8}]
      generalist_granularities: ["0"]
      routing: [{mode: dropless}, {mode: capacity, capacity_factor: 1.25}]
      aux_loss_weights: [0.01]  # shorthand for axes: {moe.aux_loss_weight: [0.01]}
      bias_update_rates: [0.0]  # shorthand for axes: {moe.bias_update_rate: [0.0]}
    axes:                       # any run-config field by its dotted path, crossed with the designs
      optimizer.weight_decay: [0.0, 0.1]
      moe.z_loss_weight: [0.001]
    learning_rates: [4.0e-4]
    seeds: [0]
    limits: {max_total_params: 6.6e9}   # points above are listed as invalid with the reason
    tier: 1                     # every point's tier (a study's parts set their own)
    run:                        # any run-config sections, copied into every point
      training: {seq_len: 2048, global_batch_size: 512, local_batch_size: 8, dataset: mds}
      data: {root: "s3://bucket/olmoe-mix/2048"}
      moe: {z_loss_weight: 0.001}   # fixed [moe] fields (not the design's own: see fields.py)

The *first* value listed on an axis is its reference value: figures that do
not study an axis show the points at its reference value.

Scales by name.  A spec (usually a shared base such as ``paper_base.yaml``, or the
``ladder.yaml`` it extends) may hold a ``ladder:`` of named shapes, ``{name, arch,
learning_rates?, max_sparsity?, description?}`` each (a rung's ``max_sparsity`` is the
largest design sparsity planned at it: where its anchor on total parameters binds; a
design beyond it is listed in invalid.csv, whatever the study's grid asks); ``scales:`` entries are then rung names
(``scales: [a50m, a20m]``), or ``{name: a50m, learning_rates: [...]}`` to override a
rung's learning rates.  A scale entry with its own ``arch`` is an inline shape; it may
not reuse a rung's name (one shape per name), so switching the whole study to another
ladder is one edit of the ladder.

Axes (``axes:``).  Each key is a run-config path (``SECTION.FIELD``) checked against
``titan_moe.run_config.job_config``'s dataclasses: an unknown path or a value of the wrong type
is refused naming it, before anything is written.  Every combination of axis values
is crossed with every design; a MoE-only field (``moe.*``) is not applied to the dense
baselines.  Fields the planner sets itself (``PLANNER_OWNED``, the design's ``[moe]``
fields, the routing trio of ``spec.moe.routing``) cannot be axes.

FLOPs.  Designs are matched by the paper's rule ``sum k_i g_i + g_gen = 1``, which
leaves out the routers (``dim x n`` weights per MoE layer, so ``6 x dim x n`` training
FLOPs per token).  Every point reports its true ``flops_ratio_vs_dense`` (FLOPs per
token from ``titan-moe describe``, routers and attention included, over its scale's
dense baseline's), GPU-hours use the true FLOPs, and ``sweep plan`` lists the points
above 1.05x.  ``limits.max_flops_ratio_vs_dense: 1.05`` turns those points into
invalid ones instead.  Counting the router in the matching would need
``sum k_i g_i + g_gen = 1 - n / (3 d_ff)`` (n experts in all, the router's ``dim x n``
against the dense FFN's ``3 x dim x d_ff``): no design with ``n >= 3 d_ff`` can meet
it (a d_ff = 1280 shape: n >= 3840), which is why the paper's rule is kept and the
truth reported; a study that wants every point within a tolerance of its dense
baseline's true FLOPs sets ``limits.max_flops_ratio_vs_dense``.

Studies (``parts:``).  A study file lists other spec files, each with a tier and
optional ``set:`` overrides (``{moe.routing: [...]}``, as ``--set``); the plan is the
union of the parts' plans, identical run configs planned once at the lowest tier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

MATCHING_MODES = ("flop", "equal_resources")
BUDGET_BASES = ("dense", "point")
ROUTING_MODES = ("dropless", "capacity")
# Which slots a full expert drops (``[moe].capacity_policy``): "priority" (titan-moe's) keeps the
# highest-probability slots of the local batch; "megablocks" (the papers' baseline) keeps them in
# token order with the capacity computed over the expert-parallel group.
CAPACITY_POLICIES = ("priority", "megablocks")
# What ``budget.tokens_per_param`` multiplies: describe's non-embedding active params, or all
# active params (embedding and LM head included, the count "50M active" refers to).
BUDGET_PARAMS = ("non_embedding_active", "active")
# OLMoE-mix-0924's sources: the default list the equal-resources mode repeats.
OLMOE_SOURCES = ("dclm", "starcoder", "pes2o", "arxiv", "open-web-math", "algebraic-stack", "wiki")
# Where an equal-resources MoE's extra tokens come from (``jobs.sweep.equal_resources``): the
# dense run's unique tokens repeated ("reuse", equal data), or all unique ("fresh").
DATA_ARMS = ("reuse", "fresh")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

# Run-config keys the planner writes itself: a spec that sets them would be silently overruled.
PLANNER_OWNED = {
    "arch": "the shape comes from spec.scales[*].arch",
    "job.dump_folder": "every point writes into its own directory",
    "model.name": "titan-moe trains model.name = 'titan_moe'",
    "training.steps": "steps follow from spec.budget",
    "optimizer.lr": "learning rates come from spec.learning_rates",
    "parallelism.expert_parallel_degree": "it is spec.cluster.ep_degree for MoE points (1 for dense)",
    "debug.seed": "seeds come from spec.seeds",
}


# --------------------------------------------------------------------------- dataclasses
@dataclass
class ClusterSpec:
    """The target cluster: EP degree every expert count must divide, and the cost model."""

    ep_degree: int = 1
    nodes: int = 1
    gpus_per_node: int = 8
    mfu: float = 0.35
    """Model FLOPs utilisation assumed for the GPU-hour estimate."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100/H200: 989)."""
    local_nproc: int = 1
    """Processes per point for ``sweep launch --local``."""


@dataclass
class BudgetSpec:
    """Token budget rule: tokens = tokens_per_param x multiple x non-embedding active params."""

    tokens_per_param: float = 20.0
    basis: str = "dense"
    """"dense": the scale's dense baseline's params (every point of a scale sees the same
    tokens); "point": each point's own active params."""
    multiples: list[float] = field(default_factory=lambda: [1.0])
    """Budget multiples ("more data" runs); each multiple is its own set of points."""
    tokens: int | None = None
    """A fixed token budget (times each multiple) instead of ``tokens_per_param``: the paper's
    appendix states its budgets in tokens (200M vs 4B)."""
    params: str = "non_embedding_active"
    """Which parameter count ``tokens_per_param`` multiplies (``BUDGET_PARAMS``)."""


@dataclass
class ScheduleSpec:
    warmup_fraction: float | None = None
    """Warmup steps as a fraction of each point's steps; None keeps run.lr_scheduler.warmup_steps."""


@dataclass
class ScaleSpec:
    """One active-parameter scale: the dense base shape (``[arch]``) every design is matched to."""

    name: str
    arch: dict[str, Any]
    learning_rates: list[float] | None = None
    """Overrides spec.learning_rates for this scale."""
    max_sparsity: Fraction | None = None
    """The largest design sparsity (expert params / active expert params) planned at this scale;
    beyond it a design is listed in invalid.csv.  A ladder rung's bound travels with the rung:
    it is where the rung's anchor binds (a50m: the paper's "50M-930M" total at s = 128)."""


@dataclass
class SetRequest:
    """One expert set of a heterogeneous combination, before the top-k rule resolves it."""

    granularity: Fraction
    sparsity: Fraction
    share: Fraction | None = None
    """Share of the FFN budget this set gets: its FLOP share ``k*g`` (flop matching) or its
    parameter share ``n*g`` (equal resources); None splits ``1 - g_gen`` equally."""


@dataclass
class RoutingSpec:
    mode: str = "dropless"
    capacity_factor: float | None = None
    capacity_policy: str = "priority"
    """Only for mode capacity: which slots a full expert drops (``CAPACITY_POLICIES``)."""

    @property
    def label(self) -> str:
        if self.mode == "dropless":
            return "dropless"
        policy = "" if self.capacity_policy == "priority" else f" {self.capacity_policy}"
        return f"capacity {self.capacity_factor:g}{policy}"


@dataclass
class DesignSpec:
    """The MoE axes; MoE points are the product of all of them."""

    granularities: list[Fraction] = field(default_factory=list)
    sparsities: list[Fraction] = field(default_factory=list)
    heterogeneous: list[list[SetRequest]] = field(default_factory=list)
    generalist_granularities: list[Fraction] = field(default_factory=lambda: [Fraction(0)])
    routing: list[RoutingSpec] = field(default_factory=lambda: [RoutingSpec()])


@dataclass
class LimitsSpec:
    """What the study may plan; points beyond are listed as invalid with the reason."""

    max_total_params: float | None = None
    """Largest total parameter count (the paper: models up to 6.6B)."""
    max_flops_ratio_vs_dense: float | None = None
    """Largest true FLOPs per token over the dense baseline's (None: report, do not exclude)."""


@dataclass
class EqualResourcesSpec:
    sources: list[str] = field(default_factory=lambda: list(OLMOE_SOURCES))
    """Data sources the MoE repeats (``[data].repeat`` needs their names)."""
    data_arms: list[str] = field(default_factory=lambda: ["reuse"])
    """``DATA_ARMS`` to plan every MoE design in (the first is the reference value)."""


@dataclass
class SweepSpec:
    name: str
    scales: list[ScaleSpec]
    moe: DesignSpec
    run: dict[str, Any]
    description: str = ""
    matching: str = "flop"
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    learning_rates: list[float] = field(default_factory=lambda: [4e-4])
    seeds: list[int] = field(default_factory=lambda: [0])
    equal_resources: EqualResourcesSpec = field(default_factory=EqualResourcesSpec)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    """Run-config path -> values, crossed with every design (checked by ``jobs.sweep.fields``)."""
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    tier: int = 1
    raw: dict[str, Any] = field(default_factory=dict)
    """The merged YAML document the spec was read from (saved next to the plan)."""

    @property
    def seq_len(self) -> int:
        return self.run["training"]["seq_len"]

    @property
    def global_batch_size(self) -> int:
        return self.run["training"]["global_batch_size"]

    def learning_rates_for(self, scale: ScaleSpec) -> list[float]:
        return scale.learning_rates if scale.learning_rates is not None else self.learning_rates


@dataclass
class StudyPart:
    spec: SweepSpec
    tier: int
    source: str
    """The part's spec file, as the study names it."""


@dataclass
class StudySpec:
    """A study: several spec files planned together, each point at its part's tier."""

    name: str
    parts: list[StudyPart]
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def cluster(self) -> ClusterSpec:
        return self.parts[0].spec.cluster  # the cost model (mfu, peak) is the same in every part

    @property
    def matching(self) -> str:
        modes = {p.spec.matching for p in self.parts}
        return modes.pop() if len(modes) == 1 else "mixed"

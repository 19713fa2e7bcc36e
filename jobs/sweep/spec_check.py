"""Checking a merged sweep-spec document into the typed ``SweepSpec`` (see ``jobs.sweep.spec``).

Every problem raises ``ConfigError`` naming the field (``spec.moe.granularities[2]``)
and saying how to fix it; nothing is planned from a spec that fails.
"""

from __future__ import annotations

import copy
from typing import Any

from jobs.sweep.spec import (
    BUDGET_BASES,
    BUDGET_PARAMS,
    CAPACITY_POLICIES,
    DATA_ARMS,
    MATCHING_MODES,
    NAME_PATTERN,
    PLANNER_OWNED,
    ROUTING_MODES,
    BudgetSpec,
    ClusterSpec,
    DesignSpec,
    EqualResourcesSpec,
    LimitsSpec,
    RoutingSpec,
    ScaleSpec,
    ScheduleSpec,
    SetRequest,
    SweepSpec,
)
from jobs.sweep import spec_axes
from jobs.sweep.spec_axes import check_moe_values, check_run_value, moe_shorthands, parse_axes
from jobs.sweep.spec_values import (
    as_list,
    check_granularity,
    check_sparsity,
    distinct,
    integer,
    mapping,
    no_unknown,
    number,
)
from titan_moe.common.errors import ConfigError
from titan_moe.model.args import TitanMoEModelArgs, format_fraction, parse_fraction


# --------------------------------------------------------------------------- checking helpers
# --------------------------------------------------------------------------- parsing
def parse_spec(doc: dict[str, Any]) -> SweepSpec:
    """Check a merged spec document; every error names the field."""
    doc = copy.deepcopy(doc)
    raw = copy.deepcopy(doc)
    known = {"name", "description", "matching", "cluster", "budget", "schedule", "scales", "moe",
             "learning_rates", "seeds", "run", "equal_resources", "ladder", "axes", "limits", "tier"}
    no_unknown(doc, known, "spec")

    name = doc.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError("spec.name", f"must be a lowercase name like 'main_grid' ([a-z0-9_.-]), got {name!r}")
    matching = doc.get("matching", "flop")
    if matching not in MATCHING_MODES:
        raise ConfigError("spec.matching", f"{matching!r} is not a matching mode; choose one of {', '.join(MATCHING_MODES)}")

    moe_doc = mapping(doc.get("moe"), "spec.moe")
    run = _parse_run(doc.get("run"), matching)
    axes = moe_shorthands(moe_doc, run)
    seq_len = run["training"]["seq_len"]
    ladder = _parse_ladder(doc.get("ladder"), seq_len)
    spec = SweepSpec(
        name=name,
        description=str(doc.get("description", "")),
        matching=matching,
        cluster=_parse_cluster(mapping(doc.get("cluster"), "spec.cluster")),
        budget=_parse_budget(mapping(doc.get("budget"), "spec.budget"), matching),
        schedule=_parse_schedule(mapping(doc.get("schedule"), "spec.schedule")),
        scales=_parse_scales(doc.get("scales"), seq_len, ladder),
        moe=_parse_design(moe_doc),
        run=run,
        learning_rates=_parse_lrs(doc.get("learning_rates", [4e-4]), "spec.learning_rates"),
        seeds=_parse_seeds(doc.get("seeds", [0])),
        equal_resources=_parse_equal(mapping(doc.get("equal_resources"), "spec.equal_resources"), matching),
        axes=parse_axes(doc.get("axes"), axes, run),
        limits=_parse_limits(mapping(doc.get("limits"), "spec.limits")),
        tier=integer(doc.get("tier", 1), "spec.tier", minimum=1),
        raw=raw,
    )
    check_moe_values(spec)
    return spec

def _parse_limits(section: dict[str, Any]) -> LimitsSpec:
    no_unknown(section, {"max_total_params", "max_flops_ratio_vs_dense"}, "spec.limits")
    limits = LimitsSpec()
    for key in ("max_total_params", "max_flops_ratio_vs_dense"):
        if section.get(key) is not None:
            setattr(limits, key, number(section[key], f"spec.limits.{key}", above=0))
    return limits


def _parse_run(value: Any, matching: str) -> dict[str, Any]:
    run = mapping(value, "spec.run")
    for key, section in run.items():
        if not isinstance(section, dict):
            raise ConfigError(f"spec.run.{key}", f"must be a mapping of run-config keys (a TOML section), got {section!r}")
    owned = dict(PLANNER_OWNED)
    if matching == "equal_resources":
        owned["data.repeat"] = "the equal-resources mode sets each MoE point's epochs"
        owned["data.token_budget"] = "the equal-resources mode sets each point's token budget"
    for path, why in owned.items():
        section, _, key = path.partition(".")
        if section in run and (not key or key in run[section]):
            raise ConfigError(f"spec.run.{path}", f"is set by the planner ({why}); remove it from the spec")
    for key, field_name in ((k, f) for k, section in run.items() for f in section):
        check_run_value(key, field_name, run[key][field_name])
    training = run.setdefault("training", {})
    integer(training.get("seq_len"), "spec.run.training.seq_len", minimum=1)
    gbs = training.get("global_batch_size")
    if isinstance(gbs, bool) or not isinstance(gbs, int) or gbs < 1:
        raise ConfigError(
            "spec.run.training.global_batch_size",
            f"must be a positive number of sequences (steps are derived from it), got {gbs!r}",
        )
    if "local_batch_size" in training:
        integer(training["local_batch_size"], "spec.run.training.local_batch_size", minimum=1)
    return run

def _parse_cluster(section: dict[str, Any]) -> ClusterSpec:
    no_unknown(section, {"ep_degree", "nodes", "gpus_per_node", "mfu", "peak_tflops", "local_nproc"}, "spec.cluster")
    c = ClusterSpec()
    for key in ("ep_degree", "nodes", "gpus_per_node", "local_nproc"):
        if key in section:
            setattr(c, key, integer(section[key], f"spec.cluster.{key}", minimum=1))
    if "mfu" in section:
        c.mfu = number(section["mfu"], "spec.cluster.mfu", above=0)
        if c.mfu > 1:
            raise ConfigError("spec.cluster.mfu", f"is a fraction of peak (0 < mfu <= 1), got {c.mfu}")
    if "peak_tflops" in section:
        c.peak_tflops = number(section["peak_tflops"], "spec.cluster.peak_tflops", above=0)
    return c


def _parse_budget(section: dict[str, Any], matching: str) -> BudgetSpec:
    no_unknown(section, {"tokens_per_param", "tokens", "params", "basis", "multiples"}, "spec.budget")
    b = BudgetSpec()
    if section.get("tokens_per_param") is not None:
        b.tokens_per_param = number(section["tokens_per_param"], "spec.budget.tokens_per_param", above=0)
    if section.get("tokens") is not None:
        if section.get("tokens_per_param") is not None:
            raise ConfigError("spec.budget.tokens", "give either tokens (a fixed budget) or tokens_per_param, "
                              "not both (a spec that extends one with tokens_per_param sets it to null)")
        tokens = section["tokens"]
        if isinstance(tokens, float) and tokens.is_integer():
            tokens = int(tokens)  # YAML reads 2.0e+9 as a float
        b.tokens = integer(tokens, "spec.budget.tokens", minimum=1)
    b.params = section.get("params", b.params)
    if b.params not in BUDGET_PARAMS:
        raise ConfigError("spec.budget.params", f"{b.params!r} is not a parameter count; choose one of {', '.join(BUDGET_PARAMS)}")
    b.basis = section.get("basis", "dense")
    if b.basis not in BUDGET_BASES:
        raise ConfigError("spec.budget.basis", f"{b.basis!r} is not a basis; choose one of {', '.join(BUDGET_BASES)}")
    if matching == "equal_resources" and b.basis != "dense":
        raise ConfigError("spec.budget.basis", "equal_resources budgets are the dense model's; set basis: dense")
    if "multiples" in section:
        b.multiples = [
            number(m, f"spec.budget.multiples[{i}]", above=0)
            for i, m in enumerate(as_list(section["multiples"], "spec.budget.multiples"))
        ]
        distinct(b.multiples, "spec.budget.multiples", lambda m: f"{m:g}")
    return b


def _parse_schedule(section: dict[str, Any]) -> ScheduleSpec:
    no_unknown(section, {"warmup_fraction"}, "spec.schedule")
    s = ScheduleSpec()
    if section.get("warmup_fraction") is not None:
        s.warmup_fraction = number(section["warmup_fraction"], "spec.schedule.warmup_fraction", minimum=0)
        if s.warmup_fraction >= 1:
            raise ConfigError("spec.schedule.warmup_fraction", f"must be < 1, got {s.warmup_fraction}")
    return s


def _parse_shape(raw: dict[str, Any], where: str, seq_len: int, known: set[str]) -> ScaleSpec:
    no_unknown(raw, known, where)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{where}.name", f"must be a lowercase name like 's100m', got {name!r}")
    arch = mapping(raw.get("arch"), f"{where}.arch")
    try:
        TitanMoEModelArgs.from_sections(arch, None, seq_len)  # the dense base shape must be valid
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None
    lrs = raw.get("learning_rates")
    max_s = raw.get("max_sparsity")
    return ScaleSpec(name, arch, None if lrs is None else _parse_lrs(lrs, f"{where}.learning_rates"),
                     None if max_s is None else check_sparsity(max_s, f"{where}.max_sparsity"))


def _parse_ladder(value: Any, seq_len: int) -> dict[str, ScaleSpec]:
    """``ladder:``: named shapes that ``scales:`` entries refer to by name."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise ConfigError("spec.ladder", "must list named shapes like {name: a50m, arch: {dim: 384, ...}}")
    rungs = [_parse_shape(mapping(raw, f"spec.ladder[{i}]"), f"spec.ladder[{i}]", seq_len,
                          {"name", "arch", "learning_rates", "max_sparsity", "description"})
             for i, raw in enumerate(value)]
    distinct([r.name for r in rungs], "spec.ladder[*].name")
    return {r.name: r for r in rungs}


def _parse_scales(value: Any, seq_len: int, ladder: dict[str, ScaleSpec]) -> list[ScaleSpec]:
    if not isinstance(value, list) or not value:
        raise ConfigError("spec.scales", "must list at least one scale: a ladder rung's name (a50m) or "
                          "{name: s100m, arch: {dim: 768, ...}}")
    scales = []
    for i, raw in enumerate(value):
        where = f"spec.scales[{i}]"
        if isinstance(raw, str) or (isinstance(raw, dict) and "arch" not in raw):
            scales.append(_rung(raw, where, ladder))
            continue
        raw = mapping(raw, where)
        if raw.get("name") in ladder:
            raise ConfigError(f"{where}.arch", f"redefines the ladder rung {raw['name']!r}; write its name "
                              f"({raw['name']}) instead of a shape, or give the shape another name")
        scales.append(_parse_shape(raw, where, seq_len, {"name", "arch", "learning_rates", "max_sparsity"}))
    distinct([s.name for s in scales], "spec.scales[*].name")
    return scales


def _rung(raw: Any, where: str, ladder: dict[str, ScaleSpec]) -> ScaleSpec:
    """A scale named by its ladder rung: ``a50m`` or ``{name: a50m, learning_rates: [...]}``."""
    if isinstance(raw, dict):
        no_unknown(raw, {"name", "learning_rates"}, where)
        name, lrs = raw.get("name"), raw.get("learning_rates")
        where = f"{where}.name"
    else:
        name, lrs = raw, None
    if name not in ladder:
        rungs = ", ".join(ladder) if ladder else "none: the spec has no ladder (extend one, e.g. paper_base.yaml)"
        raise ConfigError(where, f"{name!r} is not a ladder rung; rungs: {rungs}")
    rung = ladder[name]
    lrs = rung.learning_rates if lrs is None else _parse_lrs(lrs, f"{where}.learning_rates")
    return ScaleSpec(rung.name, copy.deepcopy(rung.arch), lrs, rung.max_sparsity)


def _parse_design(section: dict[str, Any]) -> DesignSpec:
    known = {"granularities", "sparsities", "heterogeneous", "generalist_granularities", "routing",
             *spec_axes.MOE_AXIS_SHORTHANDS, *spec_axes.MOE_FIXED_SHORTHANDS}
    no_unknown(section, known, "spec.moe")
    d = DesignSpec()
    d.granularities = [
        check_granularity(g, f"spec.moe.granularities[{i}]")
        for i, g in enumerate(as_list(section.get("granularities", []), "spec.moe.granularities", allow_empty=True))
    ]
    d.sparsities = [
        check_sparsity(s, f"spec.moe.sparsities[{i}]")
        for i, s in enumerate(as_list(section.get("sparsities", []), "spec.moe.sparsities", allow_empty=True))
    ]
    if bool(d.granularities) != bool(d.sparsities):
        missing = "sparsities" if d.granularities else "granularities"
        raise ConfigError(f"spec.moe.{missing}", "homogeneous designs need both granularities and sparsities")
    distinct(d.granularities, "spec.moe.granularities", format_fraction)
    distinct(d.sparsities, "spec.moe.sparsities", format_fraction)
    for i, combo in enumerate(as_list(section.get("heterogeneous", []), "spec.moe.heterogeneous", allow_empty=True)):
        d.heterogeneous.append(_parse_combo(combo, f"spec.moe.heterogeneous[{i}]"))
    if not d.granularities and not d.heterogeneous:
        raise ConfigError("spec.moe", "names no MoE design: give granularities + sparsities and/or heterogeneous")
    if "generalist_granularities" in section:
        d.generalist_granularities = [
            check_granularity(g, f"spec.moe.generalist_granularities[{i}]", allow_zero=True)
            for i, g in enumerate(as_list(section["generalist_granularities"], "spec.moe.generalist_granularities"))
        ]
        distinct(d.generalist_granularities, "spec.moe.generalist_granularities", format_fraction)
    if "routing" in section:
        d.routing = [_parse_routing(r, f"spec.moe.routing[{i}]") for i, r in enumerate(as_list(section["routing"], "spec.moe.routing"))]
        distinct([r.label for r in d.routing], "spec.moe.routing")
    return d


def _parse_combo(value: Any, where: str) -> list[SetRequest]:
    if not isinstance(value, list) or len(value) < 2:
        raise ConfigError(where, "a heterogeneous design lists >= 2 sets like {granularity: '1/2', sparsity: 8}")
    sets = []
    for j, raw in enumerate(value):
        name = f"{where}[{j}]"
        raw = mapping(raw, name)
        no_unknown(raw, {"granularity", "sparsity", "share"}, name)
        for key in ("granularity", "sparsity"):
            if key not in raw:
                raise ConfigError(f"{name}.{key}", "is required")
        share = None
        if raw.get("share") is not None:
            share = parse_fraction(raw["share"], f"{name}.share")
            if not 0 < share <= 1:
                raise ConfigError(f"{name}.share", f"must be in (0, 1], got {format_fraction(share)}")
        sets.append(SetRequest(check_granularity(raw["granularity"], f"{name}.granularity"),
                               check_sparsity(raw["sparsity"], f"{name}.sparsity"), share))
    if any(s.share is None for s in sets) and any(s.share is not None for s in sets):
        raise ConfigError(where, "give a share for every set or for none (none: equal split)")
    return sets


def _parse_routing(value: Any, where: str) -> RoutingSpec:
    if isinstance(value, str):
        value = {"mode": value}
    raw = mapping(value, where)
    no_unknown(raw, {"mode", "capacity_factor", "capacity_policy"}, where)
    mode = raw.get("mode", "dropless")
    if mode not in ROUTING_MODES:
        raise ConfigError(f"{where}.mode", f"{mode!r} is not a routing mode; choose one of {', '.join(ROUTING_MODES)}")
    if mode == "dropless":
        for key in ("capacity_factor", "capacity_policy"):
            if raw.get(key) is not None:
                raise ConfigError(f"{where}.{key}", "only applies to mode: capacity")
        return RoutingSpec("dropless")
    if raw.get("capacity_factor") is None:
        raise ConfigError(f"{where}.capacity_factor", "is required for mode: capacity (e.g. 1.25)")
    policy = raw.get("capacity_policy", "priority")
    if policy not in CAPACITY_POLICIES:
        raise ConfigError(f"{where}.capacity_policy",
                          f"{policy!r} is not a capacity policy; choose one of {', '.join(CAPACITY_POLICIES)}")
    return RoutingSpec("capacity", number(raw["capacity_factor"], f"{where}.capacity_factor", above=0), policy)


def _parse_lrs(value: Any, where: str) -> list[float]:
    lrs = [number(v, f"{where}[{i}]", above=0) for i, v in enumerate(as_list(value, where))]
    distinct(lrs, where, lambda v: f"{v:g}")
    return lrs


def _parse_seeds(value: Any) -> list[int]:
    seeds = [integer(v, f"spec.seeds[{i}]", minimum=0) for i, v in enumerate(as_list(value, "spec.seeds"))]
    distinct(seeds, "spec.seeds")
    return seeds


def _parse_equal(section: dict[str, Any], matching: str) -> EqualResourcesSpec:
    no_unknown(section, {"sources", "data_arms"}, "spec.equal_resources")
    e = EqualResourcesSpec()
    if "data_arms" in section:
        if matching != "equal_resources":
            raise ConfigError("spec.equal_resources.data_arms",
                              "only applies to matching: equal_resources (other studies never repeat data)")
        arms = as_list(section["data_arms"], "spec.equal_resources.data_arms")
        for i, arm in enumerate(arms):
            if arm not in DATA_ARMS:
                raise ConfigError(f"spec.equal_resources.data_arms[{i}]",
                                  f"{arm!r} is not a data arm; choose from {', '.join(DATA_ARMS)}")
        distinct(arms, "spec.equal_resources.data_arms")
        e.data_arms = arms
    if "sources" in section:
        sources = as_list(section["sources"], "spec.equal_resources.sources")
        for i, s in enumerate(sources):
            if not isinstance(s, str) or not s:
                raise ConfigError(f"spec.equal_resources.sources[{i}]", f"must be a source name, got {s!r}")
        distinct(sources, "spec.equal_resources.sources")
        e.sources = sources
    return e

"""Checking a merged sweep-spec document into the typed ``SweepSpec`` (see ``jobs.sweep.spec``).

Every problem raises ``ConfigError`` naming the field (``spec.moe.granularities[2]``)
and saying how to fix it; nothing is planned from a spec that fails.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import Any

from jobs.sweep.spec import (
    BUDGET_BASES,
    BUDGET_PARAMS,
    CAPACITY_POLICIES,
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
from jobs.sweep import fields as schema
from titan_moe.errors import ConfigError
from titan_moe.model.args import TitanMoEModelArgs, format_fraction, parse_fraction


# --------------------------------------------------------------------------- checking helpers
def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a mapping, got {value!r}")
    return value


def _no_unknown(section: dict[str, Any], known: set[str], name: str) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown key; valid keys: {', '.join(sorted(known))}")


def _list(value: Any, name: str, *, allow_empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        value = [value]
    if not value and not allow_empty:
        raise ConfigError(name, "must list at least one value")
    return value


def _number(value: Any, name: str, *, minimum: float | None = None, above: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be >= {minimum:g}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(name, f"must be > {above:g}, got {value!r}")
    return float(value)


def _int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _distinct(values: list[Any], name: str, show=str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ConfigError(name, f"lists {show(value)} twice; each value makes its own points")
        seen.add(value)


def _granularity(value: Any, name: str, *, allow_zero: bool = False) -> Fraction:
    g = parse_fraction(value, name)
    low_ok = g >= 0 if allow_zero else g > 0
    if not low_ok or g > 1 or (allow_zero and g == 1):
        bound = "0 <= g_gen < 1" if allow_zero else "0 < g <= 1"
        raise ConfigError(name, f"{format_fraction(g)} is out of range; need {bound} (a fraction of ffn_hidden)")
    return g


def _sparsity(value: Any, name: str) -> Fraction:
    s = parse_fraction(value, name)
    if s < 1:
        raise ConfigError(name, f"sparsity n/k = {format_fraction(s)} must be >= 1")
    return s


# --------------------------------------------------------------------------- parsing
def parse_spec(doc: dict[str, Any]) -> SweepSpec:
    """Check a merged spec document; every error names the field."""
    doc = copy.deepcopy(doc)
    raw = copy.deepcopy(doc)
    known = {"name", "description", "matching", "cluster", "budget", "schedule", "scales", "moe",
             "learning_rates", "seeds", "run", "equal_resources", "ladder", "axes", "limits", "tier"}
    _no_unknown(doc, known, "spec")

    name = doc.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError("spec.name", f"must be a lowercase name like 'main_grid' ([a-z0-9_.-]), got {name!r}")
    matching = doc.get("matching", "flop")
    if matching not in MATCHING_MODES:
        raise ConfigError("spec.matching", f"{matching!r} is not a matching mode; choose one of {', '.join(MATCHING_MODES)}")

    moe_doc = _mapping(doc.get("moe"), "spec.moe")
    run = _parse_run(doc.get("run"), matching)
    axes = _moe_shorthands(moe_doc, run)
    seq_len = run["training"]["seq_len"]
    ladder = _parse_ladder(doc.get("ladder"), seq_len)
    spec = SweepSpec(
        name=name,
        description=str(doc.get("description", "")),
        matching=matching,
        cluster=_parse_cluster(_mapping(doc.get("cluster"), "spec.cluster")),
        budget=_parse_budget(_mapping(doc.get("budget"), "spec.budget"), matching),
        schedule=_parse_schedule(_mapping(doc.get("schedule"), "spec.schedule")),
        scales=_parse_scales(doc.get("scales"), seq_len, ladder),
        moe=_parse_design(moe_doc),
        run=run,
        learning_rates=_parse_lrs(doc.get("learning_rates", [4e-4]), "spec.learning_rates"),
        seeds=_parse_seeds(doc.get("seeds", [0])),
        equal_resources=_parse_equal(_mapping(doc.get("equal_resources"), "spec.equal_resources")),
        axes=_parse_axes(doc.get("axes"), axes, run),
        limits=_parse_limits(_mapping(doc.get("limits"), "spec.limits")),
        tier=_int(doc.get("tier", 1), "spec.tier", minimum=1),
        raw=raw,
    )
    _check_moe_values(spec)
    return spec


def _check_moe_values(spec: SweepSpec) -> None:
    """The model's own checks (ranges, choices) on every fixed and swept ``[moe]`` value, at once."""
    probe = {"enabled": True, "expert_sets": [{"num_experts": 1, "granularity": "1", "top_k": 1}]}
    arch = spec.scales[0].arch
    checks = [(f"spec.run.moe.{k}", k, v) for k, v in spec.run.get("moe", {}).items()]
    checks += [(f"spec.axes.{path}[{i}]", path.split(".", 1)[1], v)
               for path, values in spec.axes.items() if path.startswith("moe.") for i, v in enumerate(values)]
    for where, key, value in checks:
        try:
            TitanMoEModelArgs.from_sections(arch, {**spec.run.get("moe", {}), **probe, key: value}, spec.seq_len)
        except ConfigError as exc:
            raise ConfigError(where, str(exc).split(": ", 1)[-1]) from None


# The paper's named MoE axes and fixed values, kept as the spec's own words for them:
# ``moe.aux_loss_weights: [...]`` is ``axes: {moe.aux_loss_weight: [...]}`` and
# ``moe.z_loss_weight: x`` is ``run.moe.z_loss_weight: x``.
MOE_AXIS_SHORTHANDS = {"aux_loss_weights": "aux_loss_weight", "bias_update_rates": "bias_update_rate"}
MOE_FIXED_SHORTHANDS = ("z_loss_weight", "renormalize")


def _moe_shorthands(moe_doc: dict[str, Any], run: dict[str, Any]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for key, field_name in MOE_AXIS_SHORTHANDS.items():
        if key in moe_doc:
            axes[f"moe.{field_name}"] = _list(moe_doc.pop(key), f"spec.moe.{key}")
    for key in MOE_FIXED_SHORTHANDS:
        if key in moe_doc:
            fixed = run.setdefault("moe", {})
            if key in fixed:
                raise ConfigError(f"spec.moe.{key}", f"is also set as spec.run.moe.{key}; keep one")
            _field, hint = schema.resolve(f"moe.{key}", f"spec.moe.{key}")
            fixed[key] = schema.check_value(moe_doc.pop(key), hint, f"spec.moe.{key}")
    return axes


def _axis_problem(path: str, run: dict[str, Any]) -> str | None:
    """Why ``path`` cannot be an axis (None when it can)."""
    section, _, key = path.partition(".")
    if section == "moe" and key in schema.DESIGN_OWNED_MOE:
        return f"it is set by the design ({schema.DESIGN_OWNED_MOE[key]})"
    if section == "moe" and key in schema.ROUTING_OWNED_MOE:
        return ("it is set by spec.moe.routing; give one routing entry per value, e.g. "
                "[{mode: capacity, capacity_factor: 1.0}, {mode: capacity, capacity_factor: 1.25}]")
    for owned, why in PLANNER_OWNED.items():
        if path == owned or path.startswith(owned + "."):
            return f"it is set by the planner ({why})"
    if key in run.get(section, {}):
        return f"spec.run.{path} fixes it too; keep one"
    return None


def _parse_axes(value: Any, axes: dict[str, list[Any]], run: dict[str, Any]) -> dict[str, list[Any]]:
    for path, values in _mapping(value, "spec.axes").items():
        if path in axes:
            raise ConfigError(f"spec.axes.{path}", "is also given by its spec.moe shorthand; keep one")
        axes[path] = values
    checked: dict[str, list[Any]] = {}
    for path, values in axes.items():
        where = f"spec.axes.{path}"
        _field, hint = schema.resolve(str(path), where)
        why = _axis_problem(path, run)
        if why:
            raise ConfigError(where, f"cannot be swept: {why}")
        values = [schema.check_value(v, hint, f"{where}[{i}]") for i, v in enumerate(_list(values, where))]
        _distinct([repr(v) for v in values], where)
        checked[path] = values
    columns = [schema.axis_column(p) for p in checked]
    if len(set(columns)) != len(columns):
        raise ConfigError("spec.axes", f"two axes share a column name: {', '.join(checked)}")
    return checked


def _parse_limits(section: dict[str, Any]) -> LimitsSpec:
    _no_unknown(section, {"max_total_params", "max_flops_ratio_vs_dense"}, "spec.limits")
    limits = LimitsSpec()
    for key in ("max_total_params", "max_flops_ratio_vs_dense"):
        if section.get(key) is not None:
            setattr(limits, key, _number(section[key], f"spec.limits.{key}", above=0))
    return limits


def _parse_run(value: Any, matching: str) -> dict[str, Any]:
    run = _mapping(value, "spec.run")
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
        _check_run_value(key, field_name, run[key][field_name])
    training = run.setdefault("training", {})
    _int(training.get("seq_len"), "spec.run.training.seq_len", minimum=1)
    gbs = training.get("global_batch_size")
    if isinstance(gbs, bool) or not isinstance(gbs, int) or gbs < 1:
        raise ConfigError(
            "spec.run.training.global_batch_size",
            f"must be a positive number of sequences (steps are derived from it), got {gbs!r}",
        )
    if "local_batch_size" in training:
        _int(training["local_batch_size"], "spec.run.training.local_batch_size", minimum=1)
    return run


def _check_run_value(section: str, key: str, value: Any) -> None:
    """A fixed run-config value: its path exists in the schema and the value fits the type."""
    path, where = f"{section}.{key}", f"spec.run.{section}.{key}"
    schema.resolve(path, where)
    if section == "moe" and (key in schema.DESIGN_OWNED_MOE or key in schema.ROUTING_OWNED_MOE):
        why = schema.DESIGN_OWNED_MOE.get(key, "it comes from spec.moe.routing")
        raise ConfigError(where, f"is set by the planner ({why}); remove it from the spec")
    _field, hint = schema.resolve(path, where)
    schema.check_value(value, hint, where)


def _parse_cluster(section: dict[str, Any]) -> ClusterSpec:
    _no_unknown(section, {"ep_degree", "nodes", "gpus_per_node", "mfu", "peak_tflops", "local_nproc"}, "spec.cluster")
    c = ClusterSpec()
    for key in ("ep_degree", "nodes", "gpus_per_node", "local_nproc"):
        if key in section:
            setattr(c, key, _int(section[key], f"spec.cluster.{key}", minimum=1))
    if "mfu" in section:
        c.mfu = _number(section["mfu"], "spec.cluster.mfu", above=0)
        if c.mfu > 1:
            raise ConfigError("spec.cluster.mfu", f"is a fraction of peak (0 < mfu <= 1), got {c.mfu}")
    if "peak_tflops" in section:
        c.peak_tflops = _number(section["peak_tflops"], "spec.cluster.peak_tflops", above=0)
    return c


def _parse_budget(section: dict[str, Any], matching: str) -> BudgetSpec:
    _no_unknown(section, {"tokens_per_param", "tokens", "params", "basis", "multiples"}, "spec.budget")
    b = BudgetSpec()
    if section.get("tokens_per_param") is not None:
        b.tokens_per_param = _number(section["tokens_per_param"], "spec.budget.tokens_per_param", above=0)
    if section.get("tokens") is not None:
        if section.get("tokens_per_param") is not None:
            raise ConfigError("spec.budget.tokens", "give either tokens (a fixed budget) or tokens_per_param, "
                              "not both (a spec that extends one with tokens_per_param sets it to null)")
        tokens = section["tokens"]
        if isinstance(tokens, float) and tokens.is_integer():
            tokens = int(tokens)  # YAML reads 2.0e+9 as a float
        b.tokens = _int(tokens, "spec.budget.tokens", minimum=1)
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
            _number(m, f"spec.budget.multiples[{i}]", above=0)
            for i, m in enumerate(_list(section["multiples"], "spec.budget.multiples"))
        ]
        _distinct(b.multiples, "spec.budget.multiples", lambda m: f"{m:g}")
    return b


def _parse_schedule(section: dict[str, Any]) -> ScheduleSpec:
    _no_unknown(section, {"warmup_fraction"}, "spec.schedule")
    s = ScheduleSpec()
    if section.get("warmup_fraction") is not None:
        s.warmup_fraction = _number(section["warmup_fraction"], "spec.schedule.warmup_fraction", minimum=0)
        if s.warmup_fraction >= 1:
            raise ConfigError("spec.schedule.warmup_fraction", f"must be < 1, got {s.warmup_fraction}")
    return s


def _parse_shape(raw: dict[str, Any], where: str, seq_len: int, known: set[str]) -> ScaleSpec:
    _no_unknown(raw, known, where)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{where}.name", f"must be a lowercase name like 's100m', got {name!r}")
    arch = _mapping(raw.get("arch"), f"{where}.arch")
    try:
        TitanMoEModelArgs.from_sections(arch, None, seq_len)  # the dense base shape must be valid
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None
    lrs = raw.get("learning_rates")
    return ScaleSpec(name, arch, None if lrs is None else _parse_lrs(lrs, f"{where}.learning_rates"))


def _parse_ladder(value: Any, seq_len: int) -> dict[str, ScaleSpec]:
    """``ladder:``: named shapes that ``scales:`` entries refer to by name."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise ConfigError("spec.ladder", "must list named shapes like {name: a50m, arch: {dim: 384, ...}}")
    rungs = [_parse_shape(_mapping(raw, f"spec.ladder[{i}]"), f"spec.ladder[{i}]", seq_len,
                          {"name", "arch", "learning_rates", "description"}) for i, raw in enumerate(value)]
    _distinct([r.name for r in rungs], "spec.ladder[*].name")
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
        raw = _mapping(raw, where)
        if raw.get("name") in ladder:
            raise ConfigError(f"{where}.arch", f"redefines the ladder rung {raw['name']!r}; write its name "
                              f"({raw['name']}) instead of a shape, or give the shape another name")
        scales.append(_parse_shape(raw, where, seq_len, {"name", "arch", "learning_rates"}))
    _distinct([s.name for s in scales], "spec.scales[*].name")
    return scales


def _rung(raw: Any, where: str, ladder: dict[str, ScaleSpec]) -> ScaleSpec:
    """A scale named by its ladder rung: ``a50m`` or ``{name: a50m, learning_rates: [...]}``."""
    if isinstance(raw, dict):
        _no_unknown(raw, {"name", "learning_rates"}, where)
        name, lrs = raw.get("name"), raw.get("learning_rates")
        where = f"{where}.name"
    else:
        name, lrs = raw, None
    if name not in ladder:
        rungs = ", ".join(ladder) if ladder else "none: the spec has no ladder (extend one, e.g. paper_base.yaml)"
        raise ConfigError(where, f"{name!r} is not a ladder rung; rungs: {rungs}")
    rung = ladder[name]
    lrs = rung.learning_rates if lrs is None else _parse_lrs(lrs, f"{where}.learning_rates")
    return ScaleSpec(rung.name, copy.deepcopy(rung.arch), lrs)


def _parse_design(section: dict[str, Any]) -> DesignSpec:
    known = {"granularities", "sparsities", "heterogeneous", "generalist_granularities", "routing",
             *MOE_AXIS_SHORTHANDS, *MOE_FIXED_SHORTHANDS}
    _no_unknown(section, known, "spec.moe")
    d = DesignSpec()
    d.granularities = [
        _granularity(g, f"spec.moe.granularities[{i}]")
        for i, g in enumerate(_list(section.get("granularities", []), "spec.moe.granularities", allow_empty=True))
    ]
    d.sparsities = [
        _sparsity(s, f"spec.moe.sparsities[{i}]")
        for i, s in enumerate(_list(section.get("sparsities", []), "spec.moe.sparsities", allow_empty=True))
    ]
    if bool(d.granularities) != bool(d.sparsities):
        missing = "sparsities" if d.granularities else "granularities"
        raise ConfigError(f"spec.moe.{missing}", "homogeneous designs need both granularities and sparsities")
    _distinct(d.granularities, "spec.moe.granularities", format_fraction)
    _distinct(d.sparsities, "spec.moe.sparsities", format_fraction)
    for i, combo in enumerate(_list(section.get("heterogeneous", []), "spec.moe.heterogeneous", allow_empty=True)):
        d.heterogeneous.append(_parse_combo(combo, f"spec.moe.heterogeneous[{i}]"))
    if not d.granularities and not d.heterogeneous:
        raise ConfigError("spec.moe", "names no MoE design: give granularities + sparsities and/or heterogeneous")
    if "generalist_granularities" in section:
        d.generalist_granularities = [
            _granularity(g, f"spec.moe.generalist_granularities[{i}]", allow_zero=True)
            for i, g in enumerate(_list(section["generalist_granularities"], "spec.moe.generalist_granularities"))
        ]
        _distinct(d.generalist_granularities, "spec.moe.generalist_granularities", format_fraction)
    if "routing" in section:
        d.routing = [_parse_routing(r, f"spec.moe.routing[{i}]") for i, r in enumerate(_list(section["routing"], "spec.moe.routing"))]
        _distinct([r.label for r in d.routing], "spec.moe.routing")
    return d


def _parse_combo(value: Any, where: str) -> list[SetRequest]:
    if not isinstance(value, list) or len(value) < 2:
        raise ConfigError(where, "a heterogeneous design lists >= 2 sets like {granularity: '1/2', sparsity: 8}")
    sets = []
    for j, raw in enumerate(value):
        name = f"{where}[{j}]"
        raw = _mapping(raw, name)
        _no_unknown(raw, {"granularity", "sparsity", "share"}, name)
        for key in ("granularity", "sparsity"):
            if key not in raw:
                raise ConfigError(f"{name}.{key}", "is required")
        share = None
        if raw.get("share") is not None:
            share = parse_fraction(raw["share"], f"{name}.share")
            if not 0 < share <= 1:
                raise ConfigError(f"{name}.share", f"must be in (0, 1], got {format_fraction(share)}")
        sets.append(SetRequest(_granularity(raw["granularity"], f"{name}.granularity"),
                               _sparsity(raw["sparsity"], f"{name}.sparsity"), share))
    if any(s.share is None for s in sets) and any(s.share is not None for s in sets):
        raise ConfigError(where, "give a share for every set or for none (none: equal split)")
    return sets


def _parse_routing(value: Any, where: str) -> RoutingSpec:
    if isinstance(value, str):
        value = {"mode": value}
    raw = _mapping(value, where)
    _no_unknown(raw, {"mode", "capacity_factor", "capacity_policy"}, where)
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
    return RoutingSpec("capacity", _number(raw["capacity_factor"], f"{where}.capacity_factor", above=0), policy)


def _parse_lrs(value: Any, where: str) -> list[float]:
    lrs = [_number(v, f"{where}[{i}]", above=0) for i, v in enumerate(_list(value, where))]
    _distinct(lrs, where, lambda v: f"{v:g}")
    return lrs


def _parse_seeds(value: Any) -> list[int]:
    seeds = [_int(v, f"spec.seeds[{i}]", minimum=0) for i, v in enumerate(_list(value, "spec.seeds"))]
    _distinct(seeds, "spec.seeds")
    return seeds


def _parse_equal(section: dict[str, Any]) -> EqualResourcesSpec:
    _no_unknown(section, {"sources"}, "spec.equal_resources")
    e = EqualResourcesSpec()
    if "sources" in section:
        sources = _list(section["sources"], "spec.equal_resources.sources")
        for i, s in enumerate(sources):
            if not isinstance(s, str) or not s:
                raise ConfigError(f"spec.equal_resources.sources[{i}]", f"must be a source name, got {s!r}")
        _distinct(sources, "spec.equal_resources.sources")
        e.sources = sources
    return e

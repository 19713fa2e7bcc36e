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
    DATA_ARMS,
    MATCHING_MODES,
    NAME_PATTERN,
    PLANNER_OWNED,
    ROUTING_MODES,
    BudgetSpec,
    ClusterSpec,
    DesignSpec,
    EqualResourcesSpec,
    RoutingSpec,
    ScaleSpec,
    ScheduleSpec,
    SetRequest,
    SweepSpec,
)
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
    known = {"name", "description", "matching", "cluster", "budget", "schedule", "scales", "moe",
             "learning_rates", "seeds", "run", "equal_resources"}
    _no_unknown(doc, known, "spec")

    name = doc.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError("spec.name", f"must be a lowercase name like 'main_grid' ([a-z0-9_.-]), got {name!r}")
    matching = doc.get("matching", "flop")
    if matching not in MATCHING_MODES:
        raise ConfigError("spec.matching", f"{matching!r} is not a matching mode; choose one of {', '.join(MATCHING_MODES)}")

    run = _parse_run(doc.get("run"), matching)
    seq_len = run["training"]["seq_len"]
    spec = SweepSpec(
        name=name,
        description=str(doc.get("description", "")),
        matching=matching,
        cluster=_parse_cluster(_mapping(doc.get("cluster"), "spec.cluster")),
        budget=_parse_budget(_mapping(doc.get("budget"), "spec.budget"), matching),
        schedule=_parse_schedule(_mapping(doc.get("schedule"), "spec.schedule")),
        scales=_parse_scales(doc.get("scales"), seq_len),
        moe=_parse_design(_mapping(doc.get("moe"), "spec.moe")),
        run=run,
        learning_rates=_parse_lrs(doc.get("learning_rates", [4e-4]), "spec.learning_rates"),
        seeds=_parse_seeds(doc.get("seeds", [0])),
        equal_resources=_parse_equal(_mapping(doc.get("equal_resources"), "spec.equal_resources"), matching),
        raw=doc,
    )
    return spec


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


def _parse_scales(value: Any, seq_len: int) -> list[ScaleSpec]:
    if not isinstance(value, list) or not value:
        raise ConfigError("spec.scales", "must list at least one scale like {name: s100m, arch: {dim: 768, ...}}")
    scales = []
    for i, raw in enumerate(value):
        where = f"spec.scales[{i}]"
        raw = _mapping(raw, where)
        _no_unknown(raw, {"name", "arch", "learning_rates"}, where)
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ConfigError(f"{where}.name", f"must be a lowercase name like 's100m', got {name!r}")
        arch = _mapping(raw.get("arch"), f"{where}.arch")
        try:
            TitanMoEModelArgs.from_sections(arch, None, seq_len)  # the dense base shape must be valid
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None
        lrs = raw.get("learning_rates")
        scales.append(ScaleSpec(name, arch, None if lrs is None else _parse_lrs(lrs, f"{where}.learning_rates")))
    _distinct([s.name for s in scales], "spec.scales[*].name")
    return scales


def _parse_design(section: dict[str, Any]) -> DesignSpec:
    known = {"granularities", "sparsities", "heterogeneous", "generalist_granularities", "routing",
             "aux_loss_weights", "bias_update_rates", "z_loss_weight", "renormalize"}
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
    for key in ("aux_loss_weights", "bias_update_rates"):
        if key in section:
            values = [_number(v, f"spec.moe.{key}[{i}]", minimum=0) for i, v in enumerate(_list(section[key], f"spec.moe.{key}"))]
            _distinct(values, f"spec.moe.{key}", lambda v: f"{v:g}")
            setattr(d, key, values)
    if "z_loss_weight" in section:
        d.z_loss_weight = _number(section["z_loss_weight"], "spec.moe.z_loss_weight", minimum=0)
    if "renormalize" in section:
        if not isinstance(section["renormalize"], bool):
            raise ConfigError("spec.moe.renormalize", f"must be true or false, got {section['renormalize']!r}")
        d.renormalize = section["renormalize"]
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


def _parse_equal(section: dict[str, Any], matching: str) -> EqualResourcesSpec:
    _no_unknown(section, {"sources", "data_arms"}, "spec.equal_resources")
    e = EqualResourcesSpec()
    if "data_arms" in section:
        if matching != "equal_resources":
            raise ConfigError("spec.equal_resources.data_arms",
                              "only applies to matching: equal_resources (other studies never repeat data)")
        arms = _list(section["data_arms"], "spec.equal_resources.data_arms")
        for i, arm in enumerate(arms):
            if arm not in DATA_ARMS:
                raise ConfigError(f"spec.equal_resources.data_arms[{i}]",
                                  f"{arm!r} is not a data arm; choose from {', '.join(DATA_ARMS)}")
        _distinct(arms, "spec.equal_resources.data_arms")
        e.data_arms = arms
    if "sources" in section:
        sources = _list(section["sources"], "spec.equal_resources.sources")
        for i, s in enumerate(sources):
            if not isinstance(s, str) or not s:
                raise ConfigError(f"spec.equal_resources.sources[{i}]", f"must be a source name, got {s!r}")
        _distinct(sources, "spec.equal_resources.sources")
        e.sources = sources
    return e

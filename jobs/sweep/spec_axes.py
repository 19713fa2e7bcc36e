"""A spec's run-config values and axes, checked against the run-config schema (``jobs.sweep.fields``).

``run:`` sections hold fixed values, ``axes:`` swept ones, both by run-config path;
a path that does not exist, a value of the wrong type, a value the model refuses, or a
field the planner sets itself is an error naming it -- before anything is planned.
"""

from __future__ import annotations

from typing import Any

from jobs.sweep import fields as schema
from jobs.sweep.spec import PLANNER_OWNED, SweepSpec
from jobs.sweep.spec_values import as_list, distinct, mapping
from titan_moe.common.errors import ConfigError
from titan_moe.model.args import TitanMoEModelArgs


def check_moe_values(spec: SweepSpec) -> None:
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


def moe_shorthands(moe_doc: dict[str, Any], run: dict[str, Any]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for key, field_name in MOE_AXIS_SHORTHANDS.items():
        if key in moe_doc:
            axes[f"moe.{field_name}"] = as_list(moe_doc.pop(key), f"spec.moe.{key}")
    for key in MOE_FIXED_SHORTHANDS:
        if key in moe_doc:
            fixed = run.setdefault("moe", {})
            if key in fixed:
                raise ConfigError(f"spec.moe.{key}", f"is also set as spec.run.moe.{key}; keep one")
            _field, hint = schema.resolve(f"moe.{key}", f"spec.moe.{key}")
            fixed[key] = schema.check_value(moe_doc.pop(key), hint, f"spec.moe.{key}")
    return axes


def axis_problem(path: str, run: dict[str, Any]) -> str | None:
    """Why ``path`` cannot be an axis (None when it can)."""
    section, _, key = path.partition(".")
    if section == "moe" and key in schema.DESIGN_OWNED_MOE:
        return f"it is set by the design ({schema.DESIGN_OWNED_MOE[key]})"
    if section == "moe" and key in schema.ROUTING_OWNED_MOE:
        return ("it is set by spec.moe.routing; give one routing entry per value, e.g. "
                "[{mode: capacity, capacity_factor: 1.0}, {mode: capacity, capacity_factor: 1.25}]")
    if path in ("training.seq_len", "training.global_batch_size"):
        return "every point's steps follow from it (spec.budget); plan one spec per value"
    for owned, why in PLANNER_OWNED.items():
        if path == owned or path.startswith(owned + "."):
            return f"it is set by the planner ({why})"
    if key in run.get(section, {}):
        return f"spec.run.{path} fixes it too; keep one"
    return None


def parse_axes(value: Any, axes: dict[str, list[Any]], run: dict[str, Any]) -> dict[str, list[Any]]:
    for path, values in mapping(value, "spec.axes").items():
        if path in axes:
            raise ConfigError(f"spec.axes.{path}", "is also given by its spec.moe shorthand; keep one")
        axes[path] = values
    checked: dict[str, list[Any]] = {}
    for path, values in axes.items():
        where = f"spec.axes.{path}"
        _field, hint = schema.resolve(str(path), where)
        why = axis_problem(path, run)
        if why:
            raise ConfigError(where, f"cannot be swept: {why}")
        values = [schema.check_value(v, hint, f"{where}[{i}]") for i, v in enumerate(as_list(values, where))]
        distinct([repr(v) for v in values], where)
        checked[path] = values
    columns = [schema.axis_column(p) for p in checked]
    if len(set(columns)) != len(columns):
        raise ConfigError("spec.axes", f"two axes share a column name: {', '.join(checked)}")
    return checked


def check_run_value(section: str, key: str, value: Any) -> None:
    """A fixed run-config value: its path exists in the schema and the value fits the type."""
    path, where = f"{section}.{key}", f"spec.run.{section}.{key}"
    _field, hint = schema.resolve(path, where)
    if section == "moe" and (key in schema.DESIGN_OWNED_MOE or key in schema.ROUTING_OWNED_MOE):
        why = schema.DESIGN_OWNED_MOE.get(key, "it comes from spec.moe.routing")
        raise ConfigError(where, f"is set by the planner ({why}); remove it from the spec")
    schema.check_value(value, hint, where)

"""The run-config schema as the sweep sees it: dotted paths, value checks, CSV columns, labels.

Everything here is read off ``titan_moe.run_config.job_config`` (titan-moe's sections, torchtitan's
merged in) when it is asked, never from a list of field names kept by hand, so a field
added to ``MoEConfig`` (with its default and a docstring) is at once:

- settable in a spec (``run.moe.<field>``) and sweepable (``axes: {moe.<field>: [...]}``):
  ``resolve`` checks a dotted path and ``check_value`` a value against the field's type;
- written into every MoE point's ``[moe]`` table (``jobs.sweep.designs.moe_section``);
- an ``index.csv`` column (``moe_columns``: the MoE fields a design does not set itself),
  hence a ``results.csv`` column (``sweep collect`` keeps every index column);
- labelled on a plot axis (``axis_label``: the field's docstring, else its name).

Swept fields outside ``[moe]`` get the dotted path as their column (``optimizer.weight_decay``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any

from titan_moe.run_config import job_config
from titan_moe.common.errors import ConfigError

# ``[moe]`` fields the design maths sets (``jobs.sweep.designs``): the spec names designs by
# granularity and sparsity, not by these; the index describes them in the design columns.
DESIGN_OWNED_MOE = {
    "enabled": "dense points are planned by the sweep itself",
    "expert_sets": "expert sets come from spec.moe.granularities/sparsities/heterogeneous",
    "generalist_granularity": "it is the design axis spec.moe.generalist_granularities",
    "require_flop_match": "the planner sets it from spec.matching",
}
# ``[moe]`` fields one routing entry sets together (spec.moe.routing: [{mode, capacity_factor, capacity_policy}]).
ROUTING_OWNED_MOE = ("routing", "capacity_factor", "capacity_policy")

# Columns that are not run-config fields: the design and the planner's numbers.
DESIGN_COLUMNS = [
    "name", "spec", "tier", "matching", "scale", "kind", "heterogeneous",
    "granularity", "sparsity", "granularity_value", "sparsity_value",
    "num_sets", "num_experts", "top_k", "expert_sets", "set_shares", "generalist_granularity",
]
RUN_COLUMNS = ["lr", "seed", "token_multiple", "ep_degree"]
NUMBER_COLUMNS = [
    "total_params", "active_params", "embedding_params", "non_embedding_active_params",
    "dense_total_params", "flops_per_token", "dense_flops_per_token", "flops_ratio_vs_dense",
    "flop_ratio", "flop_matched",
    "seq_len", "global_batch_size", "steps", "warmup_steps",
    "tokens_target", "tokens", "unique_tokens", "data_repeat", "data_arm",
    "train_flops", "gpu_hours", "mfu", "config",
]
# A point whose true FLOPs per token (``flops_ratio_vs_dense``) exceed its dense baseline's by more
# is listed by ``sweep plan`` and drawn hollow by ``sweep plot``.
FLOPS_TOLERANCE = 1.05
LABELS = {  # columns that are not schema fields
    "granularity": "granularity g (expert hidden / dense d_ff)",
    "granularity_value": "granularity g (expert hidden / dense d_ff)",
    "sparsity": "sparsity s = n / k",
    "sparsity_value": "sparsity s = n / k (total / active expert parameters)",
    "num_experts": "total experts per MoE layer n",
    "top_k": "active experts per token k",
    "generalist_granularity": "generalist granularity g_gen",
    "lr": "learning rate",
    "token_multiple": "training tokens (x the base budget)",
    "tokens": "training tokens",
    "total_params": "total parameters",
    "active_params": "active parameters",
    "non_embedding_active_params": "non-embedding active parameters",
    "flops_per_token": "training FLOPs per token",
    "flops_ratio_vs_dense": "FLOPs per token / dense baseline's (routers and attention included)",
    "flop_ratio": "sum k_i g_i + g_gen (the paper's matching rule)",
    "gpu_hours": "GPU-hours (estimate)",
    "tier": "tier (1 = the headline figures' runs)",
    "dense_flops_per_token": "dense baseline's training FLOPs per token",
    "data_arm": "data arm (reuse: the dense run's unique tokens repeated; fresh: all unique)",
    # result columns (``sweep collect``): the metrics the figures draw
    "train_loss": "LM loss (train CE, mean of the last 50 steps)",
    "val_loss": "validation loss (token-weighted CE)",
    "paloma_macro_ce": "Paloma macro-averaged CE (nats/token)",
    "paloma_macro_bits_per_byte": "Paloma macro-averaged bits/byte",
    "moe_load_imbalance": "load imbalance (max / mean expert load)",
    "moe_aux_loss": "LB loss (unweighted aux loss)",
    "moe_dropped_fraction": "dropped token-slots (fraction)",
}


# --------------------------------------------------------------------------- the schema
def _own_sections() -> dict[str, type]:
    """titan-moe's own section classes, looked up by name now (a replaced class is seen)."""
    out = {}
    for f in fields(job_config.JobConfig):
        cls = f.type if isinstance(f.type, type) else None
        if cls is not None:
            out[f.name] = getattr(job_config, cls.__name__, cls) if cls.__module__ == job_config.__name__ else cls
    return out


def section_class(section: str) -> type | None:
    """The dataclass of a run-config section (titan-moe's and torchtitan's fields merged)."""
    own = _own_sections()
    if section in own and section not in _torchtitan_sections():
        return own[section]  # titan-moe's alone ([arch], [moe], ...): the class as named now
    # torchtitan's sections, with titan-moe's extras merged in ([training], [metrics], [checkpoint])
    return {f.name: f.type for f in fields(job_config.merged_job_config_class())}.get(section)


def _torchtitan_sections() -> dict[str, type]:
    from torchtitan.config.job_config import JobConfig as TorchTitanJobConfig

    return {f.name: f.type for f in fields(TorchTitanJobConfig)}


def moe_schema() -> type:
    return section_class("moe")


def _field_map(cls: type) -> dict[str, Field]:
    return {f.name: f for f in fields(cls)}


def resolve(path: str, where: str) -> tuple[Field, Any]:
    """The field and its type hint at a dotted run-config path (``moe.capacity_factor``).

    ConfigError naming ``where`` (the spec key) and listing the valid names when a part
    of the path does not exist."""
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(where, f"{path!r} is not a SECTION.FIELD run-config path (e.g. moe.aux_loss_weight)")
    cls = section_class(parts[0])
    if cls is None:
        sections = sorted(f.name for f in fields(job_config.merged_job_config_class()))
        raise ConfigError(where, f"{parts[0]!r} is not a run-config section; valid sections: {', '.join(sections)}")
    done = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        known = _field_map(cls)
        if part not in known:
            raise ConfigError(where, f"{'.'.join(done)} has no field {part!r}; valid fields: {', '.join(sorted(known))}")
        hint = _hints(cls)[part]
        done.append(part)
        if i == len(parts) - 1:
            return known[part], hint
        if not (isinstance(hint, type) and is_dataclass(hint)):
            raise ConfigError(where, f"{'.'.join(done)} is a value, not a section: the path ends there")
        cls = hint
    raise AssertionError("unreachable")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a class built at run time (torchtitan's merged sections): its raw annotations
        return {f.name: f.type for f in fields(cls)}


def default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it fits the field type ``hint`` (ints for floats, numbers for strings
    as the run-config reader takes them); ConfigError naming ``where`` otherwise."""
    ok, value = _fits(value, hint)
    if not ok:
        raise ConfigError(where, f"{value!r} is not a valid {_type_name(hint)}")
    return value


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for arg in args:
            if arg is type(None):
                continue
            ok, converted = _fits(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False, value
        item = args[0] if args else Any
        out = []
        for v in value:
            ok, v = _fits(v, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    if isinstance(hint, type) and is_dataclass(hint):
        return isinstance(value, dict), value
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return True, value  # Any and other hints the planner cannot check: the run-config reader will


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# --------------------------------------------------------------------------- columns
def moe_columns() -> list[str]:
    """The ``[moe]`` fields the index reports as columns: every field a design does not set itself."""
    return [f.name for f in fields(moe_schema()) if f.name not in DESIGN_OWNED_MOE]


def axis_column(path: str) -> str:
    """The index column of a swept run-config path: the bare name inside ``[moe]``, the path elsewhere."""
    section, _, rest = path.partition(".")
    return rest if section == "moe" and "." not in rest else path


def index_columns(extra: list[str] | None = None) -> list[str]:
    """The index.csv columns, in order: design, MoE fields, run knobs, swept fields, numbers."""
    columns = [*DESIGN_COLUMNS, *moe_columns(), *RUN_COLUMNS]
    columns += [c for c in extra or [] if c not in columns]
    return columns + NUMBER_COLUMNS


# --------------------------------------------------------------------------- labels
@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                out[node.target.id] = " ".join(after.value.value.split())
    return out


def field_doc(path: str) -> str:
    """The docstring of the run-config field at ``path`` ("" when it has none)."""
    section, _, name = path.rpartition(".")
    parts = section.split(".")
    # a merged section is built at run time (no source): read its two halves' docstrings
    classes = [section_class(parts[0]), _own_sections().get(parts[0]), _torchtitan_sections().get(parts[0])]
    for cls in classes:
        if cls is None:
            continue
        for part in parts[1:]:
            cls = _hints(cls).get(part)
            if not (isinstance(cls, type) and is_dataclass(cls)):
                cls = None
                break
        if cls is not None and _docstrings(cls).get(name):
            return _docstrings(cls)[name]
    return ""


def _column_path(column: str) -> str | None:
    if "." in column:
        return column
    if column in {f.name for f in fields(moe_schema())}:
        return f"moe.{column}"
    return None


def axis_label(column: str) -> str:
    """A human label for an index/results column: the field's name in words, with its docstring's
    first sentence when that is short (``bias update rate: Loss-free balancing step size gamma``)."""
    if column in LABELS:
        return LABELS[column]
    if column.startswith("paloma_") and column.endswith("_ce"):  # one Paloma subset's CE (collect's column)
        return f"Paloma {column[len('paloma_'):-len('_ce')]} CE (nats/token)"
    path = _column_path(column)
    words = column.replace(".", " ").replace("_", " ")
    if path is None:
        return words
    doc = field_doc(path).split(". ")[0].split("; ")[0].rstrip(".")
    return f"{words}: {doc}" if doc and len(doc) <= 60 else words

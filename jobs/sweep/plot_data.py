"""The data side of ``sweep plot``: the results table, its metrics, and the reduction to one value per design.

- ``load_results``: results.csv with every all-numeric column as floats (a column
  swept by dotted path comes along without being named here);
- ``Table``: the rows plus which columns were planned (``index.csv``'s header)
  and which are metrics (every other numeric column);
- ``choose_metric``: ``auto`` is the paper's LM metric, the Paloma
  macro-averaged CE, when any point has it, else the validation loss, else the
  training loss; an unknown metric is an error listing the available ones;
- ``reduce_rows``: one row per configuration -- the mean over seeds at the
  learning rate whose seed mean is best on the *selection* metric (the LM
  metric ``auto`` picks), so every metric's figures show the same runs;
- ``references``/``at_reference``: a figure about one axis holds every other
  setting axis at its reference value (the first MoE row's, i.e. the first
  value the spec lists).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.sweep import fields
from jobs.sweep.collect import BOOKKEEPING_COLUMNS, EXTRA_TAGS, HEALTH_PREFIX
from jobs.sweep.fields import FLOPS_TOLERANCE, axis_label
from titan_moe.common.errors import ConfigError

# Columns that hold text even when a cell happens to parse as a number (granularity "1", sparsity "2").
TEXT_COLUMNS = {"name", "spec", "matching", "scale", "kind", "heterogeneous", "granularity", "sparsity",
                "expert_sets", "set_shares", "generalist_granularity", "routing", "capacity_policy", "config",
                "status", "train_loss_tag", "val_loss_tag", "flop_matched", "data_arm", "z_loss_normalization",
                "expert_impl"}
# How the planned columns (``fields.index_columns``: the schema's) split for the figures.  Every
# column not in these three sets is a *setting*: the [moe] fields, the swept run-config paths
# (``optimizer.weight_decay``), generalist_granularity, token_multiple, data_arm, seq_len and
# global_batch_size -- a figure about one axis holds each of them at its reference value.
# A run's identity beyond its configuration: reduced over (seed, lr) or bookkeeping.
RUN_COLUMNS = {"name", "config", "seed", "lr", "tier", "status"}
# The design itself: the axes the figures draw.
DESIGN_COLUMNS = {"scale", "kind", "heterogeneous", "granularity", "sparsity", "granularity_value",
                  "sparsity_value", "num_sets", "num_experts", "top_k", "expert_sets", "set_shares"}
# Numbers that follow from the design and the spec (they vary with the design, so they are never held
# fixed): the planner's numbers, less the run settings among them, and ``spec`` (the study part),
# ``matching`` and ``ep_degree`` (how a run is laid out, not what it computes).
_RUN_SETTINGS = {"seq_len", "global_batch_size", "data_arm"}
DERIVED_COLUMNS = {"spec", "matching", "ep_degree",
                   *(c for c in fields.NUMBER_COLUMNS if c not in _RUN_SETTINGS and c not in RUN_COLUMNS)}
# Routing is one axis in the figures: mode + capacity factor + policy.
ROUTING_COLUMNS = {"routing", "capacity_factor", "capacity_policy"}

FLOPS_COLUMN = "flops_ratio_vs_dense"  # points above FLOPS_TOLERANCE are drawn hollow

LM_METRICS = ("paloma_macro_ce", "val_loss", "train_loss")
"""``auto``'s order of preference: the paper's metric first."""

# Name parts of a metric where higher is better (accuracies); every other metric is a loss.
_HIGHER_IS_BETTER = {"acc", "accuracy", "len", "norm", "f1", "soft", "em", "exact", "correct", "pmi"}


def higher_is_better(metric: str) -> bool:
    parts = set(metric.lower().split("_"))
    return bool(parts & _HIGHER_IS_BETTER) and not parts & {"ce", "loss", "bpb", "ppl"}


def metric_label(metric: str) -> str:
    return axis_label(metric) + (" (higher is better)" if higher_is_better(metric) else "")


def _number(text: Any) -> float | None:
    if text in ("", None):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def routing_label(row: dict[str, Any]) -> str:
    if row.get("routing") != "capacity":
        return row.get("routing") or ""
    policy = row.get("capacity_policy") or "priority"
    return f"capacity {row['capacity_factor']:g}" + ("" if policy == "priority" else f" {policy}")


@dataclass
class Table:
    rows: list[dict[str, Any]]
    planned: list[str]
    """Columns the plan wrote (index.csv's header); the rest are results."""
    metrics: list[str] = field(default_factory=list)
    """Numeric result columns with a value in some row, in table order."""

    @property
    def settings(self) -> list[str]:
        """Planned axes that are neither the design, nor derived from it, nor the run's seed/lr."""
        skip = RUN_COLUMNS | DESIGN_COLUMNS | DERIVED_COLUMNS | ROUTING_COLUMNS
        return [c for c in self.planned if c not in skip] + ["routing_label"]

    def eval_metrics(self) -> list[str]:
        """The metrics ``--all-metrics`` draws: LM losses and eval sets, not training health."""
        health = {*EXTRA_TAGS.values()}
        return [m for m in self.metrics if not m.startswith(HEALTH_PREFIX) and m not in health]


def load_results(path: str | Path, index_csv: str | Path | None = None) -> Table:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    if index_csv is not None and Path(index_csv).is_file():
        with open(index_csv, newline="", encoding="utf-8") as f:
            planned = list(csv.DictReader(f).fieldnames or [])
    else:  # collect writes the planned columns first, then "status", then the results
        planned = header[: header.index("status")] if "status" in header else header
    numeric = [c for c in header if c not in TEXT_COLUMNS and all(_number(r[c]) is not None for r in rows if r[c] != "")]
    for row in rows:
        for key in numeric:
            row[key] = _number(row[key])
        row["heterogeneous"] = str(row.get("heterogeneous")).lower() == "true"
        row["routing_label"] = routing_label(row)
    metrics = [c for c in numeric if c not in planned and c not in BOOKKEEPING_COLUMNS
               and any(r[c] is not None for r in rows)]
    return Table(rows, planned, metrics)


def choose_metric(table: Table, metric: str = "auto") -> str:
    if metric == "auto":
        for candidate in LM_METRICS:
            if candidate in table.metrics:
                return candidate
        return "train_loss"
    if metric not in table.metrics:
        listed = ", ".join(table.metrics) or "none (run `titan-moe sweep collect` after training)"
        raise ConfigError("--metric", f"unknown metric '{metric}'; the results have: auto, {listed}")
    return metric


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _best(candidates: list[tuple[Any, float]], higher: bool) -> Any:
    return (max if higher else min)(candidates, key=lambda item: item[1])[0]


def config_key(row: dict[str, Any], planned: list[str]) -> tuple:
    return tuple(row.get(c) for c in planned if c not in RUN_COLUMNS)


def seed_means(table: Table, metric: str) -> list[dict[str, Any]]:
    """One row per (configuration, lr): the metric's mean over seeds (for loss-vs-lr)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in table.rows:
        groups[(config_key(row, table.planned), row.get("lr"))].append(row)
    out = []
    for runs in groups.values():
        value = _mean([r.get(metric) for r in runs])
        if value is not None:
            out.append({**runs[0], "value": value, "seeds": sum(r.get(metric) is not None for r in runs)})
    return out


def reduce_rows(table: Table, metric: str, select: str | None = None) -> list[dict[str, Any]]:
    """One row per configuration: the seed mean at the best learning rate (chosen on ``select``).

    Numeric result columns (MoE health, the other metrics) are the seed means of the same runs.
    """
    select = select or metric
    by_config: dict[tuple, dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in table.rows:
        by_config[config_key(row, table.planned)][row.get("lr")].append(row)
    out = []
    for per_lr in by_config.values():
        chooser, ranked = select, _ranked(per_lr, select)
        if not ranked:  # the selection metric is missing for this configuration: choose on the metric
            chooser, ranked = metric, _ranked(per_lr, metric)
        if not ranked:
            continue
        best_lr = _best(ranked, higher_is_better(chooser))
        runs = per_lr[best_lr]
        value = _mean([r.get(metric) for r in runs])
        if value is None:
            continue
        means = {c: _mean([r.get(c) for r in runs]) for c in table.metrics}
        out.append({**runs[0], **means, "value": value, "best_lr": best_lr,
                    "seeds": sum(r.get(metric) is not None for r in runs)})
    return out


def _ranked(per_lr: dict[Any, list[dict[str, Any]]], column: str) -> list[tuple[Any, float]]:
    means = [(lr, _mean([r.get(column) for r in runs])) for lr, runs in per_lr.items()]
    return [(lr, v) for lr, v in means if v is not None]


def references(rows: list[dict[str, Any]], settings: list[str]) -> dict[str, Any]:
    moe = [r for r in rows if r.get("kind") == "moe"]
    return {axis: moe[0].get(axis) for axis in settings} if moe else {}


def at_reference(rows: list[dict[str, Any]], refs: dict[str, Any], free: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "moe" and all(r.get(a) == v for a, v in refs.items() if a not in free)]


def flagged(row: dict[str, Any]) -> bool:
    """True FLOPs/token more than 5% above the dense baseline's (the router is outside the paper's rule)."""
    ratio = row.get(FLOPS_COLUMN)
    return isinstance(ratio, float) and ratio > FLOPS_TOLERANCE

"""What a study costs before it is launched: GPU-hours per scale and per spec.

The numbers are the planner's own (``jobs.sweep.plan``): every point trains
``tokens`` tokens at ``flops_per_token`` (``6 x non-embedding active params +
12 x layers x heads x head_dim x seq_len``, from ``titan-moe describe``), so::

    train_flops = sum over points of flops_per_token x tokens
    gpu_hours   = train_flops / (mfu x peak_tflops x 1e12) / 3600

``mfu`` and ``peak_tflops`` are the spec's ``cluster`` values (``sweep plan
--mfu/--peak-tflops`` override them).  ``flops_per_token`` is the point's true
count (routers included), not the paper's matching rule.  Invalid points cost
nothing: they are not run.

``tier_rows`` adds up the same numbers per tier, with the running total, so a lab
with a fraction of the budget sees which tiers it can reproduce.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from jobs.sweep.plan import Plan

COST_COLUMNS = ["study", "scale", "points", "dense", "moe", "tokens", "train_flops", "gpu_hours"]
TIER_COLUMNS = ["study", "tier", "points", "gpu_hours", "cumulative_points", "cumulative_gpu_hours"]


def cost_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per scale of the plan, then a ``total`` row (scale ``"all"``)."""
    by_scale: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for point in plan.points:
        by_scale[point.row["scale"]].append(point.row)
    rows = [_row(plan.spec.name, scale, points) for scale, points in by_scale.items()]
    rows.append(_row(plan.spec.name, "all", [p.row for p in plan.points]))
    return rows


def _row(study: str, scale: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "study": study, "scale": scale, "points": len(points),
        "dense": sum(p["kind"] == "dense" for p in points), "moe": sum(p["kind"] == "moe" for p in points),
        "tokens": sum(p["tokens"] for p in points),
        "train_flops": sum(p["train_flops"] for p in points),
        "gpu_hours": sum(p["gpu_hours"] for p in points),
    }


def format_table(rows: list[dict[str, Any]], mfu: float, peak_tflops: float) -> str:
    """A plain-text table (one line per row) with the assumptions in its header."""
    header = ["study", "scale", "points", "dense", "MoE", "tokens", "train FLOPs", "GPU-hours"]
    cells = [[r["study"], r["scale"], str(r["points"]), str(r["dense"]), str(r["moe"]), f"{r['tokens']:.3e}",
              f"{r['train_flops']:.3e}", _hours(r["gpu_hours"])] for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    title = f"cost at MFU {mfu:g} of {peak_tflops:g} TFLOP/s per GPU (GPU-hours = FLOPs / (MFU x peak) / 3600)"
    return "\n".join([title, line(header), *(line(c) for c in cells)])


def _hours(hours: float) -> str:
    return f"{hours:,.1f}" if hours >= 10 else f"{hours:.4g}"


def tier_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per tier (lowest first): its points and GPU-hours, and the totals up to it."""
    by_tier: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for point in plan.points:
        by_tier[point.row["tier"]].append(point.row)
    rows, points, hours = [], 0, 0.0
    for tier in sorted(by_tier):
        tier_hours = sum(p["gpu_hours"] for p in by_tier[tier])
        points += len(by_tier[tier])
        hours += tier_hours
        rows.append({"study": plan.spec.name, "tier": tier, "points": len(by_tier[tier]), "gpu_hours": tier_hours,
                     "cumulative_points": points, "cumulative_gpu_hours": hours})
    return rows


def format_tiers(rows: list[dict[str, Any]]) -> str:
    header = ["study", "tier", "points", "GPU-hours", "cumulative points", "cumulative GPU-hours"]
    cells = [[r["study"], str(r["tier"]), str(r["points"]), _hours(r["gpu_hours"]), str(r["cumulative_points"]),
              _hours(r["cumulative_gpu_hours"])] for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
                     for line in [header, *cells])

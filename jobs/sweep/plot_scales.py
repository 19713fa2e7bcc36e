"""The figures of ``sweep plot`` that span the scales: the headline and the learning-rate sweep.

- ``best_granularity_vs_scale``: per active scale and sparsity, the granularity
  with the best metric (ties: the first in table order).  Left panel: best g vs
  the scale's active parameters, a line per sparsity, each point annotated with
  that model's total parameters; right panel: best g vs total parameters, a line
  per active scale.  The paper's claim reads as flat lines on the right and a
  trend on the left.
- ``loss_vs_lr``: a panel per scale, the seed mean at every learning rate, a
  line per design at the reference settings (and the dense baseline).
"""

from __future__ import annotations

from typing import Any

from jobs.sweep.fields import axis_label
from jobs.sweep.plot_data import at_reference, flagged, higher_is_better
from jobs.sweep.plot_draw import Panel, params_label
from jobs.sweep.plot_families import ScaleData
from jobs.sweep.plot_figures import Figures, panel


def active_size(d: ScaleData) -> float | None:
    """The scale's active parameters: its dense baseline's, else the mean over its MoE points."""
    for r in d.rows:
        if r["kind"] == "dense" and r.get("active_params"):
            return r["active_params"]
    values = [r["active_params"] for r in d.moe() if r.get("active_params")]
    return sum(values) / len(values) if values else None


def best_granularity_vs_scale(f: Figures, scales: list[ScaleData]) -> None:
    if len(scales) < 2:  # one scale's best g is read off loss_vs_granularity; the headline is about the trend
        f.notes.append("a single active scale; skipped best_granularity_vs_scale")
        return
    pick = max if higher_is_better(f.metric) else min
    left = Panel("best granularity vs active parameters", axis_label("active_params"), "best granularity g", {},
                 yscale="log2", yfractions=True, xparams=True)
    right = Panel("best granularity vs total parameters", axis_label("total_params"), "best granularity g", {},
                  yscale="log2", yfractions=True, xparams=True)
    for d in scales:
        active = active_size(d)
        homog = d.moe()
        totals, best_gs = [], []
        for sparsity in dict.fromkeys(r["sparsity"] for r in homog):
            rows = [r for r in homog if r["sparsity"] == sparsity]
            if len({r["granularity"] for r in rows}) < 2 or active is None:
                continue
            best = pick(rows, key=lambda r: r["value"])  # the first of equals, in table order
            g = best["granularity_value"]
            left.series.setdefault(f"sparsity {sparsity}", []).append((active, g))
            right.series.setdefault(d.scale, []).append((best["total_params"], g))
            totals.append(best["total_params"])
            best_gs.append(g)
            if flagged(best):
                left.flagged.setdefault(f"sparsity {sparsity}", []).append(active)
                right.flagged.setdefault(d.scale, []).append(best["total_params"])
        if totals:  # the total-parameter range behind the scale's points
            low, high = params_label(min(totals)), params_label(max(totals))
            left.annotations.append((active, max(best_gs), (low if low == high else f"{low}-{high}") + " total"))
    if not left.series:
        f.notes.append("no scale has two granularities at one sparsity (with active parameters); "
                       "skipped best_granularity_vs_scale")
        return
    f.add("best_granularity_vs_scale", [left, right],
          "Headline: the best expert granularity g per active scale (one line per sparsity, annotated with the "
          "best model's total parameters), and vs total parameters (one line per active scale)",
          scales[0].fixed())


def loss_vs_lr(f: Figures, scales: list[ScaleData], per_lr: list[dict[str, Any]]) -> None:
    panels = []
    for d in scales:
        moe = [r for r in at_reference(per_lr, d.refs) if r["scale"] == d.scale and not r["heterogeneous"]]
        dense = [r for r in per_lr if r["scale"] == d.scale and r["kind"] == "dense"
                 and r.get("token_multiple") == d.refs.get("token_multiple")]
        rows = dense + moe
        if len({r["lr"] for r in rows}) < 2:
            continue

        def design(r: dict[str, Any]) -> tuple[float, str]:
            return r["lr"], "dense" if r["kind"] == "dense" else f"g {r['granularity']}, s {r['sparsity']}"

        panels.append(panel(f"{f.noun} vs learning rate ({d.scale})", axis_label("lr"), f.ylabel, rows, design))
    if not panels:
        f.notes.append("a single learning rate per design; skipped loss_vs_lr")
        return
    f.add("loss_vs_lr", panels, f"{f.noun.capitalize()} vs peak learning rate, one line per design", scales[0].fixed(),
          reduction="mean over seeds at each learning rate")

"""``titan-moe sweep plot DIR``: the paper's figures from ``results.csv``.

Every figure is written as ``plots/<stem>.png``, ``.svg`` and ``.json`` (the
plotted series; see ``jobs.sweep.plot_draw``), with a caption naming the spec.
Figures, per scale, when the table has the data for them:

- ``loss_vs_granularity_<scale>`` (paper Fig. 2): loss vs granularity, one
  line per sparsity, the dense baseline as a horizontal line;
- ``loss_vs_total_experts_<scale>``: loss vs total experts n, one line per
  (fixed) granularity, dense line;
- ``load_balancing_<scale>_<design>``: three panels -- loss, LB loss (the
  unweighted aux loss) and load imbalance (max / mean expert load), all means
  over the last 50 steps -- vs the bias rate gamma, one line per aux weight;
- ``generalist_<scale>``: one line per generalist granularity (none = 0);
- ``dropless_vs_default_<scale>``: one line per routing (dropless, token
  dropping), plus the dropped fraction when it was logged;
- ``heterogeneous_vs_homogeneous_<scale>``: loss vs sparsity per design family;
- ``more_data_<scale>`` (paper Fig. 16/17): one panel per token budget, loss
  vs sparsity (total / active expert parameters) per granularity, the dense
  baseline of that budget as a horizontal line.

Reduction: for each configuration the loss is averaged over seeds, then the
best learning rate is taken (the MoE-health columns are those of the same
runs).  A figure about one axis shows the points at the *reference value* of
every other axis: the value of the first MoE row in the table, i.e. the first
value the spec lists.  A figure whose data is absent is skipped with a note.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from jobs.sweep.plot_draw import Panel, draw

HEALTH = ("moe_aux_loss", "moe_load_imbalance", "moe_dropped_fraction")
NUMERIC = {"granularity_value", "sparsity_value", "num_experts", "top_k", "capacity_factor", "aux_loss_weight",
           "bias_update_rate", "lr", "seed", "token_multiple", "tokens", "train_loss", "val_loss",
           "paloma_macro_ce", *HEALTH}
METRICS = {
    "train_loss": "LM loss (train, mean of last 50 steps)",
    "val_loss": "LM loss (validation)",
    "paloma_macro_ce": "Paloma macro CE (nats/token)",
}
# Axes a figure may hold at their reference value.
REFERENCE_AXES = ("generalist_granularity", "routing_label", "aux_loss_weight", "bias_update_rate", "token_multiple")
CONFIG_KEYS = ("scale", "kind", "heterogeneous", "granularity", "sparsity", "set_shares", "expert_sets",
               "generalist_granularity", "routing_label", "aux_loss_weight", "bias_update_rate", "token_multiple")


# --------------------------------------------------------------------------- table
def _number(text: str) -> float | None:
    try:
        return float(text) if text not in ("", None) else None
    except ValueError:
        return None


def routing_label(row: dict[str, Any]) -> str:
    if row.get("routing") != "capacity":
        return row.get("routing", "")
    policy = row.get("capacity_policy") or "priority"
    return f"capacity {row['capacity_factor']:g}" + ("" if policy == "priority" else f" {policy}")


def load_results(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            if key in row:
                row[key] = _number(row[key])
        row["heterogeneous"] = str(row.get("heterogeneous")).lower() == "true"
        row["routing_label"] = routing_label(row)
    return rows


def choose_metric(rows: list[dict[str, Any]], metric: str = "auto") -> str:
    if metric != "auto":
        return metric
    for candidate in ("val_loss", "train_loss"):
        if any(r.get(candidate) is not None for r in rows):
            return candidate
    return "train_loss"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def reduce_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per configuration: mean over seeds, then the best learning rate."""
    by_config: dict[tuple, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        value = row.get(metric)
        if value is None or not math.isfinite(value):
            continue
        by_config[tuple(row.get(k) for k in CONFIG_KEYS)][row.get("lr")].append(row)
    out = []
    for per_lr in by_config.values():
        best_lr, runs = min(per_lr.items(), key=lambda item: _mean([r[metric] for r in item[1]]))
        health = {k: _mean([r.get(k) for r in runs]) for k in HEALTH}
        out.append({**runs[0], **health, "value": _mean([r[metric] for r in runs]), "best_lr": best_lr,
                    "seeds": len(runs)})
    return out


def references(rows: list[dict[str, Any]]) -> dict[str, Any]:
    moe = [r for r in rows if r.get("kind") == "moe"]
    return {axis: moe[0].get(axis) for axis in REFERENCE_AXES} if moe else {}


def at_reference(rows: list[dict[str, Any]], refs: dict[str, Any], free: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "moe" and all(r.get(a) == v for a, v in refs.items() if a not in free)]


def _series(rows, key_fn, column: str = "value") -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        key = key_fn(r)
        if key is not None and r.get(column) is not None:
            out[key[1]].append((key[0], r[column]))
    return dict(out)


# --------------------------------------------------------------------------- the figures
class _Figures:
    """Collects the figures of one results table (one scale at a time)."""

    def __init__(self, out_dir: Path, spec: str, description: str, metric: str):
        self.out_dir, self.spec, self.metric = out_dir, spec, metric
        self.ylabel = METRICS.get(metric, metric)
        self.about = f"Spec '{spec}'" + (f" ({description.rstrip('.')})" if description else "")
        self.written: list[Path] = []
        self.notes: list[str] = []

    def caption(self, what: str, fixed: str) -> str:
        return (f"{what}. {self.about}. {self.ylabel}: mean over seeds at the best learning rate; "
                f"{fixed}.")

    def add(self, stem: str, panels: list[Panel], what: str, fixed: str) -> None:
        self.written += draw(panels, out_dir=self.out_dir, stem=stem, spec=self.spec, caption=self.caption(what, fixed))


def _fixed(refs: dict[str, Any], free: tuple[str, ...] = ()) -> str:
    names = {"generalist_granularity": "g_gen", "routing_label": "routing", "aux_loss_weight": "aux weight",
             "bias_update_rate": "bias rate", "token_multiple": "budget x"}
    parts = [f"{names[a]} {v:g}" if isinstance(v, float) else f"{names[a]} {v}"
             for a, v in refs.items() if a not in free and v not in (None, "")]
    return "other axes at the spec's first values: " + ", ".join(parts) if parts else "no other axes"


def _dense(reduced: list[dict[str, Any]], multiple: Any) -> dict[str, float]:
    for r in reduced:
        if r["kind"] == "dense" and r.get("token_multiple") == multiple:
            return {"dense baseline": r["value"]}
    return {}


def _scale_figures(f: _Figures, scale: str, mine: list[dict[str, Any]], refs: dict[str, Any]) -> None:
    dense = _dense(mine, refs.get("token_multiple"))
    homog = [r for r in at_reference(mine, refs) if not r["heterogeneous"]]
    many_sparsities = len({r["sparsity"] for r in homog}) > 1
    gx = "granularity g (expert hidden = g x dense d_ff)"

    if homog:
        f.add(f"loss_vs_granularity_{scale}",
              [Panel(f"loss vs granularity ({scale})", gx, f.ylabel,
                     _series(homog, lambda r: (r["granularity_value"], f"sparsity {r['sparsity']}")), dense,
                     xfractions=True)],
              "LM loss vs expert granularity, one line per sparsity s = n/k, FLOP-matched to the dense line", _fixed(refs))
        f.add(f"loss_vs_total_experts_{scale}",
              [Panel(f"loss vs total experts ({scale})", "total experts per MoE layer n", f.ylabel,
                     _series(homog, lambda r: (r["num_experts"], f"granularity {r['granularity']}")), dense)],
              "LM loss vs total experts n at fixed granularity (one line each)", _fixed(refs))
    else:
        f.notes.append(f"{scale}: no homogeneous MoE points at the reference settings; "
                       "skipped loss_vs_granularity, loss_vs_total_experts")

    _load_balancing(f, scale, mine, refs)

    generalist = [r for r in at_reference(mine, refs, free=("generalist_granularity",)) if not r["heterogeneous"]]
    if len({r["generalist_granularity"] for r in generalist}) > 1:
        def gen_label(r):
            g = r["generalist_granularity"]
            label = "no generalist" if g in ("0", "") else f"generalist {g}"
            return r["granularity_value"], label + (f", sparsity {r['sparsity']}" if many_sparsities else "")

        f.add(f"generalist_{scale}",
              [Panel(f"generalist expert vs none ({scale})", "granularity g of the routed experts", f.ylabel,
                     _series(generalist, gen_label), dense, xfractions=True)],
              "Generalist (shared) expert of granularity g_gen vs none, FLOP-matched",
              _fixed(refs, ("generalist_granularity",)))
    else:
        f.notes.append(f"{scale}: a single generalist granularity; skipped generalist")

    routing = [r for r in at_reference(mine, refs, free=("routing_label",)) if not r["heterogeneous"]]
    if len({r["routing_label"] for r in routing}) > 1:
        def route(r):
            return r["granularity_value"], r["routing_label"] + (f", sparsity {r['sparsity']}" if many_sparsities else "")

        lines = _series(routing, route)
        dropping = {label for label in lines if not label.startswith("dropless")}
        panels = [Panel(f"dropless vs token dropping ({scale})", gx, f.ylabel, lines, dense, xfractions=True,
                        dashed=dropping)]
        dropped = _series([r for r in routing if r["routing"] == "capacity"], route, "moe_dropped_fraction")
        if dropped:
            panels.append(Panel("dropped token-slots", gx, "dropped fraction (mean of last 50 steps)", dropped,
                                xfractions=True))
        f.add(f"dropless_vs_default_{scale}", panels,
              "Dropless routing vs the default token-dropping routing (capacity per expert, overflow dropped)",
              _fixed(refs, ("routing_label",)))
    else:
        f.notes.append(f"{scale}: a single routing mode; skipped dropless_vs_default")

    mixed = at_reference(mine, refs)
    if any(r["heterogeneous"] for r in mixed) and any(not r["heterogeneous"] for r in mixed):
        def family(r):
            if r["heterogeneous"]:
                shares = r.get("set_shares") or ""
                equal = len(set(shares.split("+"))) <= 1
                return r["sparsity_value"], f"heterogeneous {r['granularity']}" + ("" if equal else f" (shares {shares})")
            return r["sparsity_value"], f"homogeneous {r['granularity']}"

        lines = _series(mixed, family)
        f.add(f"heterogeneous_vs_homogeneous_{scale}",
              [Panel(f"heterogeneous vs homogeneous ({scale})", "sparsity (total / active expert parameters)",
                     f.ylabel, lines, dense, dashed={label for label in lines if label.startswith("hetero")})],
              "Heterogeneous layers (two expert sets of different granularity) vs homogeneous, FLOP-matched",
              _fixed(refs))
    else:
        f.notes.append(f"{scale}: no heterogeneous and homogeneous points to compare; skipped heterogeneous_vs_homogeneous")

    _more_data(f, scale, mine, refs)


def _load_balancing(f: _Figures, scale: str, mine: list[dict[str, Any]], refs: dict[str, Any]) -> None:
    free = ("aux_loss_weight", "bias_update_rate")
    balancing = [r for r in at_reference(mine, refs, free=free) if not r["heterogeneous"]]
    if len({(r["aux_loss_weight"], r["bias_update_rate"]) for r in balancing}) < 2:
        f.notes.append(f"{scale}: a single load-balancing setting; skipped load_balancing")
        return
    gamma = "loss-free bias rate γ"
    for design in dict.fromkeys((r["granularity"], r["sparsity"]) for r in balancing):
        rows = [r for r in balancing if (r["granularity"], r["sparsity"]) == design]
        n = rows[0]["num_experts"]

        def by_alpha(r):
            return r["bias_update_rate"], f"aux weight α = {r['aux_loss_weight']:g}"

        panels = [Panel("loss", gamma, f.ylabel, _series(rows, by_alpha), xscale="category")]
        for column, title, label in (("moe_aux_loss", "LB loss", "LB loss (unweighted aux loss)"),
                                     ("moe_load_imbalance", "load imbalance", "max / mean expert load")):
            series = _series(rows, by_alpha, column)
            if series:
                panels.append(Panel(title, gamma, label, series, xscale="category"))
            else:
                f.notes.append(f"{scale}: no {column} logged; load_balancing shows no {title} panel")
        tag = f"g{design[0]}_s{design[1]}".replace("/", "-")
        f.add(f"load_balancing_{scale}_{tag}", panels,
              f"Load balancing at g = {design[0]}, s = {design[1]} (n = {n:g} experts): aux-loss weight α x "
              f"loss-free bias rate γ; LB loss and load imbalance averaged over the last 50 steps", _fixed(refs, free))


def _more_data(f: _Figures, scale: str, mine: list[dict[str, Any]], refs: dict[str, Any]) -> None:
    budgets = [r for r in at_reference(mine, refs, free=("token_multiple",)) if not r["heterogeneous"]]
    multiples = sorted({r["token_multiple"] for r in budgets})
    if len(multiples) < 2:
        f.notes.append(f"{scale}: a single token budget; skipped more_data")
        return
    panels = []
    for m in multiples:
        rows = [r for r in budgets if r["token_multiple"] == m]
        tokens = rows[0].get("tokens")
        title = f"{_tokens_label(tokens)} training tokens (x{m:g})" if tokens else f"budget x{m:g}"
        panels.append(Panel(title, "sparsity (total / active expert parameters)", f.ylabel,
                            _series(rows, lambda r: (r["sparsity_value"], f"granularity {r['granularity']}")),
                            _dense(mine, m)))
    f.add(f"more_data_{scale}", panels,
          "MoE vs dense at each token budget: FLOP-matched MoEs against the dense baseline of the same budget",
          _fixed(refs, ("token_multiple",)))


def _tokens_label(tokens: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return f"{tokens:,.0f}"


def make_figures(rows: list[dict[str, Any]], out_dir: Path, spec: str = "", metric: str = "auto",
                 description: str = "") -> tuple[list[Path], list[str]]:
    """Every figure the table supports; returns (written files, notes on skipped figures)."""
    metric = choose_metric(rows, metric)
    reduced = reduce_rows(rows, metric)
    if not reduced:
        return [], [f"no point has a value for {metric}; run `titan-moe sweep collect` after training"]
    refs = references(reduced)
    f = _Figures(out_dir, spec, description, metric)
    for scale in dict.fromkeys(r["scale"] for r in reduced):
        _scale_figures(f, scale, [r for r in reduced if r["scale"] == scale], refs)
    return f.written, f.notes


def plot(plan_dir: str | Path, results: str | Path | None = None, out: str | Path | None = None,
         metric: str = "auto", spec: str = "") -> tuple[list[Path], list[str]]:
    plan_dir = Path(plan_dir)
    results = Path(results) if results else plan_dir / "results.csv"
    if not results.is_file():
        from titan_moe.errors import ConfigError

        raise ConfigError("DIR", f"{results} does not exist; run `titan-moe sweep collect {plan_dir}` first")
    rows = load_results(results)
    if not spec and rows:
        spec = rows[0].get("spec", "")
    index = plan_dir / "index.json"
    description = json.loads(index.read_text()).get("description", "") if index.is_file() else ""
    return make_figures(rows, Path(out) if out else plan_dir / "plots", spec, metric, description)

"""``titan-moe sweep plot DIR``: the paper's figures from ``results.csv`` (PNG + SVG, one file per figure).

Figures, one per scale (``plots/<figure>_<scale>.{png,svg}``):

- ``loss_vs_granularity``: LM loss vs granularity, one line per sparsity, the
  dense baseline as a horizontal line;
- ``loss_vs_total_experts``: LM loss vs total experts, one line per granularity;
- ``dropless_vs_capacity``: one line per routing mode (and sparsity);
- ``load_balancing_<design>``: a heat map over aux-loss weight x bias update rate;
- ``heterogeneous_vs_homogeneous``: LM loss vs sparsity, one line per design family;
- ``generalist``: one line per generalist granularity (and sparsity).

Reduction: for each configuration, the loss is averaged over seeds, then the
best learning rate is taken.  A figure about one axis shows the points at the
*reference value* of every other axis: the value of the first MoE row in the
table, i.e. the first value the spec lists.  A figure whose data is absent is
skipped with a printed note.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

NUMERIC = {"granularity_value", "sparsity_value", "num_experts", "top_k", "capacity_factor", "aux_loss_weight",
           "bias_update_rate", "lr", "seed", "token_multiple", "train_loss", "val_loss", "paloma_macro_ce"}
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


def load_results(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            if key in row:
                row[key] = _number(row[key])
        row["heterogeneous"] = str(row.get("heterogeneous")).lower() == "true"
        cf = row.get("capacity_factor")
        row["routing_label"] = row.get("routing", "") if row.get("routing") != "capacity" else f"capacity {cf:g}"
    return rows


def choose_metric(rows: list[dict[str, Any]], metric: str = "auto") -> str:
    if metric != "auto":
        return metric
    for candidate in ("val_loss", "train_loss"):
        if any(r.get(candidate) is not None for r in rows):
            return candidate
    return "train_loss"


def reduce_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per configuration: mean over seeds, then the best learning rate."""
    by_config: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    first: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        value = row.get(metric)
        if value is None or not math.isfinite(value):
            continue
        key = tuple(row.get(k) for k in CONFIG_KEYS)
        by_config[key][row.get("lr")].append(value)
        first.setdefault(key, row)
    out = []
    for key, per_lr in by_config.items():
        best_lr, values = min(per_lr.items(), key=lambda item: sum(item[1]) / len(item[1]))
        out.append({**first[key], "value": sum(values) / len(values), "best_lr": best_lr, "seeds": len(values)})
    return out


def references(rows: list[dict[str, Any]]) -> dict[str, Any]:
    moe = [r for r in rows if r.get("kind") == "moe"]
    return {axis: moe[0].get(axis) for axis in REFERENCE_AXES} if moe else {}


def at_reference(rows: list[dict[str, Any]], refs: dict[str, Any], free: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "moe" and all(r.get(a) == v for a, v in refs.items() if a not in free)]


def _fraction_label(value: float) -> str:
    f = Fraction(value).limit_denominator(4096)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


# --------------------------------------------------------------------------- drawing
def _new_axes():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    return plt, fig, ax


def _save(plt, fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def line_figure(series: dict[str, list[tuple[float, float]]], dense: float | None, *, out_dir: Path, stem: str,
                title: str, xlabel: str, ylabel: str, xfractions: bool = False) -> list[Path]:
    plt, fig, ax = _new_axes()
    xs = sorted({x for points in series.values() for x, _ in points})
    for label, points in series.items():
        points = sorted(points)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1.2, label="dense baseline")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([_fraction_label(x) if xfractions else f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir, stem)


def heatmap_figure(grid: dict[tuple[float, float], float], *, out_dir: Path, stem: str, title: str,
                   ylabel_metric: str) -> list[Path]:
    import numpy as np

    plt, fig, ax = _new_axes()
    auxes = sorted({a for a, _ in grid})
    biases = sorted({b for _, b in grid})
    values = np.full((len(auxes), len(biases)), np.nan)
    for (a, b), v in grid.items():
        values[auxes.index(a), biases.index(b)] = v
    image = ax.imshow(values, cmap="viridis_r", aspect="auto", origin="lower")
    for i in range(len(auxes)):
        for j in range(len(biases)):
            if not np.isnan(values[i, j]):
                # dark text on the light (low-loss) cells, light text on the dark ones
                light_cell = image.norm(values[i, j]) < 0.5
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="black" if light_cell else "white")
    ax.set_xticks(range(len(biases)), [f"{b:g}" for b in biases])
    ax.set_yticks(range(len(auxes)), [f"{a:g}" for a in auxes])
    ax.set_xlabel("loss-free bias update rate γ")
    ax.set_ylabel("aux-loss weight α")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=ylabel_metric)
    return _save(plt, fig, out_dir, stem)


# --------------------------------------------------------------------------- the figures
def _dense_value(reduced: list[dict[str, Any]], scale: str, refs: dict[str, Any]) -> float | None:
    for r in reduced:
        if r["kind"] == "dense" and r["scale"] == scale and r.get("token_multiple") == refs.get("token_multiple"):
            return r["value"]
    return None


def _series(rows, key_fn) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        key = key_fn(r)
        if key is not None:
            out[key[1]].append((key[0], r["value"]))
    return dict(out)


def make_figures(rows: list[dict[str, Any]], out_dir: Path, spec: str = "", metric: str = "auto") -> tuple[list[Path], list[str]]:
    """Every figure the table supports; returns (written files, notes on skipped figures)."""
    metric = choose_metric(rows, metric)
    ylabel = METRICS.get(metric, metric)
    reduced = reduce_rows(rows, metric)
    written: list[Path] = []
    notes: list[str] = []
    if not reduced:
        return [], [f"no point has a value for {metric}; run `titan-moe sweep collect` after training"]
    refs = references(reduced)
    prefix = f"{spec}: " if spec else ""
    for scale in dict.fromkeys(r["scale"] for r in reduced):
        mine = [r for r in reduced if r["scale"] == scale]
        dense = _dense_value(mine, scale, refs)
        homog = [r for r in at_reference(mine, refs) if not r["heterogeneous"]]

        def by_sparsity(r):
            return r["granularity_value"], f"sparsity {r['sparsity']}"

        if homog:
            written += line_figure(_series(homog, by_sparsity), dense, out_dir=out_dir,
                                   stem=f"loss_vs_granularity_{scale}", title=f"{prefix}loss vs granularity ({scale})",
                                   xlabel="granularity g (expert hidden = g x dense d_ff)", ylabel=ylabel, xfractions=True)
            written += line_figure(_series(homog, lambda r: (r["num_experts"], f"granularity {r['granularity']}")), dense,
                                   out_dir=out_dir, stem=f"loss_vs_total_experts_{scale}",
                                   title=f"{prefix}loss vs total experts ({scale})",
                                   xlabel="total experts per MoE layer n", ylabel=ylabel)
        else:
            notes.append(f"{scale}: no homogeneous MoE points at the reference settings; skipped loss_vs_granularity, loss_vs_total_experts")

        many_sparsities = len({r["sparsity"] for r in homog}) > 1
        routing = [r for r in at_reference(mine, refs, free=("routing_label",)) if not r["heterogeneous"]]
        if len({r["routing_label"] for r in routing}) > 1:
            written += line_figure(
                _series(routing, lambda r: (r["granularity_value"], r["routing_label"] + (f", sparsity {r['sparsity']}" if many_sparsities else ""))),
                dense, out_dir=out_dir, stem=f"dropless_vs_capacity_{scale}",
                title=f"{prefix}dropless vs capacity routing ({scale})",
                xlabel="granularity g", ylabel=ylabel, xfractions=True)
        else:
            notes.append(f"{scale}: a single routing mode; skipped dropless_vs_capacity")

        balancing = [r for r in at_reference(mine, refs, free=("aux_loss_weight", "bias_update_rate")) if not r["heterogeneous"]]
        if len({(r["aux_loss_weight"], r["bias_update_rate"]) for r in balancing}) > 1:
            for design in dict.fromkeys((r["granularity"], r["sparsity"]) for r in balancing):
                grid = {(r["aux_loss_weight"], r["bias_update_rate"]): r["value"] for r in balancing
                        if (r["granularity"], r["sparsity"]) == design}
                tag = f"g{design[0]}_s{design[1]}".replace("/", "-")
                written += heatmap_figure(grid, out_dir=out_dir, stem=f"load_balancing_{scale}_{tag}",
                                          title=f"{prefix}load balancing, g={design[0]}, s={design[1]} ({scale})",
                                          ylabel_metric=ylabel)
        else:
            notes.append(f"{scale}: a single load-balancing setting; skipped load_balancing")

        mixed = at_reference(mine, refs)
        if any(r["heterogeneous"] for r in mixed) and any(not r["heterogeneous"] for r in mixed):
            def family(r):
                if r["heterogeneous"]:
                    shares = r.get("set_shares") or ""
                    equal = len(set(shares.split("+"))) <= 1
                    return r["sparsity_value"], f"heterogeneous {r['granularity']}" + ("" if equal else f" (shares {shares})")
                return r["sparsity_value"], f"homogeneous {r['granularity']}"

            written += line_figure(_series(mixed, family), dense, out_dir=out_dir,
                                   stem=f"heterogeneous_vs_homogeneous_{scale}",
                                   title=f"{prefix}heterogeneous vs homogeneous ({scale})",
                                   xlabel="sparsity (total / active expert parameters)", ylabel=ylabel)
        else:
            notes.append(f"{scale}: no heterogeneous and homogeneous points to compare; skipped heterogeneous_vs_homogeneous")

        generalist = [r for r in at_reference(mine, refs, free=("generalist_granularity",)) if not r["heterogeneous"]]
        if len({r["generalist_granularity"] for r in generalist}) > 1:
            def gen_label(r):
                g = r["generalist_granularity"]
                label = "no generalist" if g in ("0", "") else f"generalist {g}"
                return r["granularity_value"], label + (f", sparsity {r['sparsity']}" if many_sparsities else "")

            written += line_figure(_series(generalist, gen_label), dense, out_dir=out_dir, stem=f"generalist_{scale}",
                                   title=f"{prefix}generalist expert vs none ({scale})",
                                   xlabel="granularity g of the routed experts", ylabel=ylabel, xfractions=True)
        else:
            notes.append(f"{scale}: a single generalist granularity; skipped generalist")
    return written, notes


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
    return make_figures(rows, Path(out) if out else plan_dir / "plots", spec, metric)

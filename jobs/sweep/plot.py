"""``titan-moe sweep plot DIR``: the paper's figures from ``results.csv``.

Every figure is written as ``<stem>.png``, ``.svg`` and ``.json`` (exactly the
plotted series; format in ``jobs.sweep.plot_draw``), its caption naming the
spec and the metric.  The families, drawn whenever the table has their data
(a family without data is skipped with a note):

per scale (``jobs.sweep.plot_families``)
- ``loss_vs_granularity_<scale>`` (Fig. 2): a line per sparsity, dense line;
- ``loss_vs_granularity_fixed_n_<scale>`` (Fig. 2 left): a line per total
  expert count n (the n that have two granularities or more);
- ``loss_vs_total_experts_<scale>``: a line per granularity;
- ``load_balancing_<scale>``: loss, load imbalance and LB loss vs n, a line per
  (aux weight, bias rate) setting (the mean over the designs run under all);
- ``routing_<scale>``: dropless vs token dropping (with and without the
  loss-free bias when both ran), plus the dropped fraction;
- ``generalist_<scale>``: a line per generalist granularity, homogeneous
  experts vs g and (second panel) heterogeneous experts vs sparsity;
- ``heterogeneous_<scale>``: a panel per pair (g, g/2) against the
  homogeneous designs of g and g/2;
- ``more_data_<scale>`` (Fig. 16/17): a panel per token budget;
- ``equal_resources_<scale>`` (the equal-resources paper; its ``matching`` or a
  ``data_arm`` column): loss vs activation rate k/n, a line per data arm and g;
- ``loss_vs_<axis>_<scale>``: any other numeric setting the spec sweeps;

across scales (``jobs.sweep.plot_scales``)
- ``best_granularity_vs_scale`` (the headline) and ``loss_vs_lr``.

Metrics (``jobs.sweep.plot_data``): ``--metric auto`` is the Paloma
macro-averaged CE when any point has it, else the validation loss, else the
training loss; any collected metric column is accepted; ``--all-metrics``
writes one figure set per LM loss and eval metric into ``<out>/<metric>/``;
``--only GLOB`` draws the figures whose name matches.
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs.sweep.plot_data import Table, choose_metric, load_results, reduce_rows, references, seed_means
from jobs.sweep.plot_families import ScaleData, scale_figures
from jobs.sweep.plot_figures import Figures, varying
from jobs.sweep.plot_scales import best_granularity_vs_scale, loss_vs_lr
from titan_moe.common.errors import ConfigError


def make_figures(table: Table, out_dir: Path, spec: str = "", metric: str = "auto", description: str = "",
                 only: tuple[str, ...] = ()) -> tuple[list[Path], list[str]]:
    """Every figure the table supports for one metric; returns (written files, notes on skipped figures)."""
    select = choose_metric(table, "auto")
    metric = choose_metric(table, metric)
    reduced = reduce_rows(table, metric, select)
    if not reduced:
        return [], [f"no point has a value for {metric}; run `titan-moe sweep collect` after training"]
    settings = table.settings
    refs = references(reduced, settings)
    shown = varying(reduced, settings)
    f = Figures(out_dir, spec, description, metric, select, only)
    equal = any(r.get("matching") == "equal_resources" or r.get("data_arm") for r in reduced)
    scales = [ScaleData(scale, [r for r in reduced if r["scale"] == scale], refs, shown)
              for scale in dict.fromkeys(r["scale"] for r in reduced)]
    for d in scales:
        scale_figures(f, d, settings, equal)
    best_granularity_vs_scale(f, scales)
    loss_vs_lr(f, scales, seed_means(table, metric))
    return f.written, f.notes


def plot(plan_dir: str | Path, results: str | Path | None = None, out: str | Path | None = None,
         metric: str = "auto", spec: str = "", all_metrics: bool = False,
         only: tuple[str, ...] = ()) -> tuple[list[Path], list[str]]:
    plan_dir = Path(plan_dir)
    results = Path(results) if results else plan_dir / "results.csv"
    if not results.is_file():
        raise ConfigError("DIR", f"{results} does not exist; run `titan-moe sweep collect {plan_dir}` first")
    table = load_results(results, plan_dir / "index.csv")
    if not spec and table.rows:
        spec = table.rows[0].get("spec", "")
    index = plan_dir / "index.json"
    description = json.loads(index.read_text()).get("description", "") if index.is_file() else ""
    out_dir = Path(out) if out else plan_dir / "plots"
    if not all_metrics:
        return make_figures(table, out_dir, spec, metric, description, only)
    if metric != "auto":
        raise ConfigError("--all-metrics", "draws every metric; leave --metric out")
    written: list[Path] = []
    notes: list[str] = []
    for name in table.eval_metrics():
        files, skipped = make_figures(table, out_dir / name, spec, name, description, only)
        written += files
        notes += [note for note in skipped if note not in notes]  # the same skips recur for every metric
    if not table.eval_metrics():
        notes.append("no metric has a value; run `titan-moe sweep collect` after training")
    return written, notes

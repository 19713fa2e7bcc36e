"""The per-scale figure families of ``sweep plot`` (the paper's figures about one active scale).

Each family draws the rows of one scale that sit at the reference value of every
setting axis except its own (``plot_data.at_reference``); a family whose data is
absent adds a note instead of a figure.  ``scale_figures`` draws them all.
"""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from typing import Any

from jobs.sweep.fields import axis_label
from jobs.sweep.plot_data import at_reference, flagged
from jobs.sweep.plot_draw import Panel
from jobs.sweep.plot_figures import Figures, dense_line, fixed, panel, tokens_label

GX = axis_label("granularity_value")
SX = axis_label("sparsity_value")
NX = axis_label("num_experts")
# Setting axes a named family draws; any other swept setting gets the generic loss_vs_<axis> figure.
NAMED_SETTINGS = {"generalist_granularity", "routing_label", "aux_loss_weight", "bias_update_rate", "token_multiple",
                  "data_arm"}


class ScaleData:
    """One scale's reduced rows, the table's reference settings and which of them vary."""

    def __init__(self, scale: str, rows: list[dict[str, Any]], refs: dict[str, Any], shown: set[str]):
        self.scale, self.rows, self.refs, self.shown = scale, rows, refs, shown
        self.dense = dense_line(rows, refs)

    def moe(self, free: tuple[str, ...] = (), heterogeneous: bool | None = False) -> list[dict[str, Any]]:
        rows = at_reference(self.rows, self.refs, free)
        return rows if heterogeneous is None else [r for r in rows if r["heterogeneous"] == heterogeneous]

    def fixed(self, free: tuple[str, ...] = ()) -> str:
        return fixed(self.refs, self.shown, free)


def _with_sparsity(label: str, r: dict[str, Any], many: bool) -> str:
    return label + (f", sparsity {r['sparsity']}" if many else "")


def grid(f: Figures, d: ScaleData) -> None:
    """Fig. 2: loss vs g (a line per sparsity; a line per total expert count n) and loss vs n."""
    homog = d.moe()
    if not homog:
        f.skip(d.scale, "loss_vs_granularity, loss_vs_granularity_fixed_n, loss_vs_total_experts",
               "no homogeneous MoE points at the reference settings")
        return
    s = d.scale
    f.add(f"loss_vs_granularity_{s}",
          [panel(f"{f.noun} vs granularity ({s})", GX, f.ylabel, homog,
                 lambda r: (r["granularity_value"], f"sparsity {r['sparsity']}"), reference_lines=d.dense,
                 xfractions=True)],
          f"{f.noun.capitalize()} vs expert granularity, one line per sparsity s = n/k, FLOP-matched to the dense line", d.fixed())
    counts: dict[float, int] = defaultdict(int)
    for r in homog:
        counts[r["num_experts"]] += 1
    shared = [r for r in homog if counts[r["num_experts"]] > 1]
    if shared:
        f.add(f"loss_vs_granularity_fixed_n_{s}",
              [panel(f"{f.noun} vs granularity at fixed total experts ({s})", GX, f.ylabel, shared,
                     lambda r: (r["granularity_value"], f"n = {r['num_experts']:g}"), reference_lines=d.dense,
                     xfractions=True)],
              f"Paper Fig. 2 (left): {f.noun} vs granularity at a fixed total expert count n (one line per n; "
              "finer experts at fixed n activate more of them)", d.fixed())
    else:
        f.skip(s, "loss_vs_granularity_fixed_n", "no total expert count n with two granularities")
    f.add(f"loss_vs_total_experts_{s}",
          [panel(f"{f.noun} vs total experts ({s})", NX, f.ylabel, homog,
                 lambda r: (r["num_experts"], f"granularity {r['granularity']}"), reference_lines=d.dense)],
          f"{f.noun.capitalize()} vs total experts n at fixed granularity (one line each)", d.fixed())


def load_balancing(f: Figures, d: ScaleData) -> None:
    """Loss and load imbalance vs n, a line per (aux weight, bias rate) setting."""
    free = ("aux_loss_weight", "bias_update_rate")
    rows = d.moe(free)
    settings = list(dict.fromkeys((r["aux_loss_weight"], r["bias_update_rate"]) for r in rows))
    if len(settings) < 2:
        f.skip(d.scale, "load_balancing", "a single load-balancing setting")
        return
    by_design: dict[tuple, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_design[(r["granularity"], r["sparsity"])][(r["aux_loss_weight"], r["bias_update_rate"])] = r
    # Only designs run under every setting: each line then averages the same designs.
    complete = [runs for runs in by_design.values() if len(runs) == len(settings)]
    if not complete:
        f.skip(d.scale, "load_balancing", "no design ran under every load-balancing setting")
        return
    panels = []
    for column, title, ylabel in (("value", f.noun, f.ylabel),
                                  ("moe_load_imbalance", "load imbalance", axis_label("moe_load_imbalance")),
                                  ("moe_aux_loss", "LB loss", axis_label("moe_aux_loss"))):
        series: dict[str, list[tuple[float, float]]] = {}
        over: dict[str, list[float]] = {}
        for alpha, gamma in settings:
            per_n: dict[float, list[float]] = defaultdict(list)
            marked: set[float] = set()  # an average holding an over-budget design is marked too
            for runs in complete:
                r = runs[(alpha, gamma)]
                if r.get(column) is not None:
                    per_n[r["num_experts"]].append(r[column])
                    if flagged(r):
                        marked.add(r["num_experts"])
            label = f"α = {alpha:g}, γ = {gamma:g}"
            if per_n:
                series[label] = [(n, sum(v) / len(v)) for n, v in per_n.items()]
                over[label] = sorted(marked)
        if series:
            panels.append(Panel(f"{title} ({d.scale})", NX, ylabel, series, flagged={k: v for k, v in over.items() if v}))
        elif column != "value":
            f.notes.append(f"{d.scale}: no {column} logged; load_balancing shows no {title} panel")
    f.add(f"load_balancing_{d.scale}", panels,
          f"Load balancing: aux-loss weight α x loss-free bias rate γ, a line per setting vs total experts n; "
          f"each point averages the designs (g, s) with that n among the {len(complete)} run under every setting; "
          "load imbalance (max / mean expert load) and LB loss are means over the last 50 steps",
          d.fixed(free))


def routing(f: Figures, d: ScaleData) -> None:
    """Dropless vs token dropping, each with and without the loss-free bias when both ran."""
    rows = d.moe(("routing_label", "bias_update_rate"))
    if len({r["routing_label"] for r in rows}) < 2:
        f.skip(d.scale, "routing", "a single routing mode")
        return
    biases = len({r["bias_update_rate"] for r in rows}) > 1
    many = len({r["sparsity"] for r in rows}) > 1

    def label(r: dict[str, Any]) -> tuple[float, str]:
        text = r["routing_label"] + (f", γ = {r['bias_update_rate']:g}" if biases else "")
        return r["granularity_value"], _with_sparsity(text, r, many)

    main = panel(f"routing ({d.scale})", GX, f.ylabel, rows, label, reference_lines=d.dense, xfractions=True)
    main.dashed = {name for name in main.series if not name.startswith("dropless")}
    panels = [main]
    dropping = [r for r in rows if r.get("routing") == "capacity"]
    dropped = panel("dropped token-slots", GX, axis_label("moe_dropped_fraction"), dropping, label,
                    "moe_dropped_fraction", xfractions=True)
    if dropped.series:
        panels.append(dropped)
    f.add(f"routing_{d.scale}", panels,
          "Dropless routing vs the default token-dropping routing (capacity per expert, overflow dropped)"
          + (", each with and without the loss-free bias (rate γ)" if biases else ""),
          d.fixed(("routing_label", "bias_update_rate") if biases else ("routing_label",)))


def _generalist_name(r: dict[str, Any]) -> str:
    g = r["generalist_granularity"]
    return "no generalist" if g in ("0", "", None) else f"generalist {g}"


def _coarser(r: dict[str, Any]) -> float:
    return max(float(Fraction(g)) for g in r["granularity"].split("+"))


def generalist(f: Figures, d: ScaleData) -> None:
    """A line per generalist granularity (none = 0), homogeneous and heterogeneous routed experts."""
    free = ("generalist_granularity",)
    homog, het = d.moe(free), d.moe(free, heterogeneous=True)
    panels = []
    if len({r["generalist_granularity"] for r in homog}) > 1:
        many = len({r["sparsity"] for r in homog}) > 1
        panels.append(panel(f"generalist expert vs none ({d.scale})", "granularity g of the routed experts",
                            f.ylabel, homog, lambda r: (r["granularity_value"], _with_sparsity(_generalist_name(r), r, many)),
                            reference_lines=d.dense, xfractions=True))
    if len({r["generalist_granularity"] for r in het}) > 1:
        many = len({r["sparsity"] for r in het}) > 1
        # x: the pair's coarser granularity g (the pair is (g, g/2)), so the panel reads like the one beside it
        panels.append(panel(f"with heterogeneous experts ({d.scale})", "heterogeneous pair (g, g/2): g", f.ylabel,
                            het, lambda r: (_coarser(r), _with_sparsity(_generalist_name(r), r, many)),
                            reference_lines=d.dense, xfractions=True))
    if not panels:
        f.skip(d.scale, "generalist", "a single generalist granularity")
        return
    f.add(f"generalist_{d.scale}", panels, "Generalist (shared) expert of granularity g_gen vs none, FLOP-matched",
          d.fixed(free))


def heterogeneous(f: Figures, d: ScaleData) -> None:
    """One panel per heterogeneous pair (g, g/2): it against the homogeneous designs of g and of g/2."""
    het, homog = d.moe(heterogeneous=True), d.moe()
    if not het or not homog:
        f.skip(d.scale, "heterogeneous", "no heterogeneous and homogeneous points to compare")
        return
    panels = []
    for pair in dict.fromkeys(r["granularity"] for r in het):
        members = pair.split("+")
        rows = [r for r in het if r["granularity"] == pair] + [r for r in homog if r["granularity"] in members]

        def family(r: dict[str, Any]) -> tuple[float, str]:
            if not r["heterogeneous"]:
                return r["sparsity_value"], f"homogeneous {r['granularity']}"
            shares = r.get("set_shares") or ""
            equal = len(set(shares.split("+"))) <= 1
            return r["sparsity_value"], f"heterogeneous {pair}" + ("" if equal else f" (shares {shares})")

        p = panel(f"g = {' + '.join(members)} ({d.scale})", SX, f.ylabel, rows, family, reference_lines=d.dense)
        p.dashed = {name for name in p.series if name.startswith("hetero")}
        panels.append(p)
    f.add(f"heterogeneous_{d.scale}", panels,
          "Heterogeneous layers (two expert sets, granularities g and g/2, each half of the active FFN) vs the "
          "homogeneous designs of either granularity, one panel per pair, FLOP-matched", d.fixed())


def more_data(f: Figures, d: ScaleData) -> None:
    """Paper Fig. 16/17: a panel per token budget, MoE lines against that budget's dense line."""
    rows = d.moe(("token_multiple",))
    multiples = sorted({r["token_multiple"] for r in rows})
    if len(multiples) < 2:
        f.skip(d.scale, "more_data", "a single token budget")
        return
    panels = []
    for m in multiples:
        budget = [r for r in rows if r["token_multiple"] == m]
        tokens = budget[0].get("tokens")
        title = f"{tokens_label(tokens)} training tokens (x{m:g})" if tokens else f"budget x{m:g}"
        panels.append(panel(title, SX, f.ylabel, budget,
                            lambda r: (r["sparsity_value"], f"granularity {r['granularity']}"),
                            reference_lines=dense_line(d.rows, d.refs, multiple=m)))
    f.add(f"more_data_{d.scale}", panels,
          "MoE vs dense at each token budget: FLOP-matched MoEs against the dense baseline of the same budget",
          d.fixed(("token_multiple",)))


def equal_resources(f: Figures, d: ScaleData) -> None:
    """The second paper: loss vs activation rate k/n, a line per data arm and granularity, dense lines."""
    rows = d.moe(("data_arm",))
    if not rows:
        f.skip(d.scale, "equal_resources", "no homogeneous MoE points")
        return
    arms = list(dict.fromkeys(r.get("data_arm") or "" for r in rows))

    def label(r: dict[str, Any]) -> tuple[float, str]:
        arm = r.get("data_arm") or ""
        return r["top_k"] / r["num_experts"], (f"{arm}, " if arm else "") + f"g = {r['granularity']}"

    dense: dict[str, float] = {}
    for arm in arms:
        dense.update(dense_line(d.rows, d.refs, arm=arm, label=f"dense ({arm} data)" if arm else "dense baseline"))
    p = panel(f"equal resources ({d.scale})", "activation rate k/n", f.ylabel, rows, label, reference_lines=dense,
              xfractions=True)
    p.dashed = {name for name in p.series if name.startswith("fresh")}
    f.add(f"equal_resources_{d.scale}", [p],
          "MoE with the dense model's total parameters, training FLOPs and unique data vs activation rate k/n"
          + (" (reuse arm: repeated data; fresh arm: new tokens)" if len(arms) > 1 else ""), d.fixed(("data_arm",)))


def other_settings(f: Figures, d: ScaleData, settings: list[str]) -> None:
    """Any other swept numeric setting (e.g. a run-config field by dotted path): loss vs it, a line per design."""
    for axis in settings:
        if axis in NAMED_SETTINGS:
            continue
        rows = d.moe((axis,))
        values = {r.get(axis) for r in rows}
        if len(values) < 2 or not all(isinstance(v, float) for v in values):
            continue
        log = all(v > 0 for v in values)
        f.add(f"loss_vs_{axis}_{d.scale}",
              [panel(f"{f.noun} vs {axis_label(axis)} ({d.scale})", axis_label(axis), f.ylabel, rows,
                     lambda r, a=axis: (r[a], f"g {r['granularity']}, s {r['sparsity']}"),
                     xscale="log2" if log else "category", reference_lines=d.dense)],
              f"{f.noun.capitalize()} vs {axis_label(axis)}, one line per design", d.fixed((axis,)))


def scale_figures(f: Figures, d: ScaleData, settings: list[str], equal: bool) -> None:
    grid(f, d)
    load_balancing(f, d)
    routing(f, d)
    generalist(f, d)
    heterogeneous(f, d)
    more_data(f, d)
    other_settings(f, d, settings)
    if equal:
        equal_resources(f, d)


"""Drawing one figure of ``sweep plot``: panels of line series, written as PNG, SVG and JSON.

A figure is a list of ``Panel``s side by side, and a caption under them that
names the spec.  Next to ``<stem>.png`` and ``<stem>.svg`` lies ``<stem>.json``,
the plotted numbers themselves (format ``titan-moe-figure/1``)::

    {"format": "titan-moe-figure/1", "figure": stem, "spec": ..., "caption": ...,
     "metric": column, "metric_label": ...,                # what the y values are (sweep plot --metric)
     "panels": [{"title": ..., "xlabel": ..., "ylabel": ...,
                 "series": {label: [[x, y], ...]},        # sorted by x
                 "reference_lines": {label: y},           # e.g. the dense baseline
                 "flagged": {label: [x, ...]},            # points drawn hollow: true FLOPs/token
                                                          # > 1.05 x the dense baseline's
                 "annotations": [[x, y, text], ...]}]}    # e.g. total parameters at a point

so a reader (or a test) can check a figure without reading pixels.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

FIGURE_FORMAT = "titan-moe-figure/1"


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]
    reference_lines: dict[str, float] = field(default_factory=dict)
    """Horizontal lines (label -> y): the dense baseline."""
    xscale: str = "log2"
    """"log2" (granularity, experts, sparsity) or "category" (evenly spaced x values, e.g. gamma = 0)."""
    xfractions: bool = False
    """Label x ticks as fractions (granularity 1/64)."""
    dashed: set[str] = field(default_factory=set)
    """Series drawn dashed with square markers (the variant next to the solid baselines)."""
    flagged: dict[str, list[float]] = field(default_factory=dict)
    """label -> x values of points drawn hollow (compute more than 5% above the dense baseline's)."""
    annotations: list[tuple[float, float, str]] = field(default_factory=list)
    xparams: bool = False
    """Label x ticks as parameter counts (50M, 1.2B)."""
    yscale: str = "linear"
    """"linear" or "log2" (granularity on the y axis)."""
    yfractions: bool = False

FLAG_NOTE = "hollow: > 1.05x dense FLOPs/token"


def fraction_label(value: float) -> str:
    f = Fraction(value).limit_denominator(4096)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def params_label(params: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return f"{params:g}"


def _draw_panel(ax, panel: Panel) -> None:
    xs = sorted({x for points in panel.series.values() for x, _ in points})
    position = {x: i for i, x in enumerate(xs)} if panel.xscale == "category" else {x: x for x in xs}
    for label, points in panel.series.items():
        points = sorted(points)
        style = {"linestyle": "--", "marker": "s"} if label in panel.dashed else {"marker": "o"}
        (line,) = ax.plot([position[x] for x, _ in points], [y for _, y in points], label=label, **style)
        hollow = [(x, y) for x, y in points if x in set(panel.flagged.get(label, ()))]
        if hollow:  # over-budget points: white fill over the line's own marker
            ax.plot([position[x] for x, _ in hollow], [y for _, y in hollow], linestyle="none",
                    marker=style["marker"], markerfacecolor="white", markeredgecolor=line.get_color(), zorder=3)
    if any(panel.flagged.values()):
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="gray", label=FLAG_NOTE)
    for x, y, text in panel.annotations:
        ax.annotate(text, (position.get(x, x), y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, (label, y) in enumerate(panel.reference_lines.items()):
        ax.axhline(y, color="black", linestyle=("--", ":", "-.")[i % 3], linewidth=1.2, label=label)
    if panel.xscale == "log2":
        ax.set_xscale("log", base=2)
    if panel.yscale == "log2":
        ax.set_yscale("log", base=2)
        ys = sorted({y for points in panel.series.values() for _, y in points})
        ax.set_yticks(ys)
        ax.set_yticklabels([fraction_label(y) if panel.yfractions else f"{y:g}" for y in ys])
    ax.set_xticks([position[x] for x in xs])
    ax.set_xticklabels([fraction_label(x) if panel.xfractions else params_label(x) if panel.xparams else f"{x:g}"
                        for x in xs])
    ax.minorticks_off()
    if len(xs) > 8:  # e.g. 1 .. 16384 experts: upright labels would run into each other
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    if panel.xscale == "category" and xs:
        ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if _legend_outside(panel):  # many lines: a legend inside would cover them
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=7)


def _legend_outside(panel: Panel) -> bool:
    return len(panel.series) + len(panel.reference_lines) + bool(panel.flagged) > 5


def draw(panels: list[Panel], *, out_dir: Path, stem: str, spec: str, caption: str, metric: str = "",
         metric_label: str = "") -> list[Path]:
    """Render the panels side by side with the caption below; write PNG, SVG and the JSON data."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    width = sum(7.0 if _legend_outside(p) else 5.2 for p in panels) + 0.6
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _draw_panel(ax, panel)
    wrapped = "\n".join(textwrap.wrap(caption, width=int(width * 15)))
    fig.text(0.01, 0.01, wrapped, ha="left", va="bottom", fontsize=7.5, color="#333333")
    lines = wrapped.count("\n") + 1
    fig.tight_layout(rect=(0, 0.035 * lines + 0.02, 1, 1))

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg", out_dir / f"{stem}.json"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    data = {
        "format": FIGURE_FORMAT, "figure": stem, "spec": spec, "caption": caption, "metric": metric,
        "metric_label": metric_label,
        "panels": [{"title": p.title, "xlabel": p.xlabel, "ylabel": p.ylabel,
                    "series": {label: [list(xy) for xy in sorted(points)] for label, points in p.series.items()},
                    "reference_lines": dict(p.reference_lines),
                    "flagged": {label: sorted(xs) for label, xs in p.flagged.items() if xs},
                    "annotations": [list(a) for a in p.annotations]} for p in panels],
    }
    paths[2].write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return paths

"""What every figure family of ``sweep plot`` shares: the figure collector, captions, and series building.

``Figures`` writes one figure at a time through ``plot_draw.draw`` and keeps the
notes on the figures a table could not support.  ``lines`` turns reduced rows
into a panel's series (and the points to draw hollow, see
``plot_data.flagged``); ``dense_line`` finds the dense baseline a panel is drawn
against; ``fixed`` says in the caption which settings the points were held at.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from jobs.sweep.fields import axis_label
from jobs.sweep.plot_data import flagged, higher_is_better, metric_label
from jobs.sweep.plot_draw import Panel, draw

KeyFn = Callable[[dict[str, Any]], "tuple[float, str] | None"]

_SETTING_NAMES = {"generalist_granularity": "g_gen", "routing_label": "routing", "aux_loss_weight": "aux weight",
                  "bias_update_rate": "bias rate", "token_multiple": "budget x", "data_arm": "data"}


class Figures:
    """Collects the figures drawn from one results table for one metric."""

    def __init__(self, out_dir: Path, spec: str, description: str, metric: str, select: str,
                 only: tuple[str, ...] = ()):
        self.out_dir, self.spec, self.metric, self.select = out_dir, spec, metric, select
        self.only = only
        """Figure-name globs to draw (``sweep plot --only``); empty: every figure."""
        self.ylabel = metric_label(metric)
        self.noun = "score" if higher_is_better(metric) else "loss"  # in titles: "loss vs granularity"
        self.about = f"Spec '{spec}'" + (f" ({description.rstrip('.')})" if description else "")
        self.written: list[Path] = []
        self.notes: list[str] = []

    def reduction(self) -> str:
        chosen = "" if self.select == self.metric else f" (the learning rate with the best {self.select})"
        return f"mean over seeds at the best learning rate{chosen}"

    def add(self, stem: str, panels: list[Panel], what: str, fixed: str, reduction: str | None = None) -> None:
        if self.only and not any(fnmatch(stem, pattern) for pattern in self.only):
            return
        caption = f"{what}. {self.about}. Metric: {self.ylabel}, {reduction or self.reduction()}; {fixed}."
        if any(p.flagged for p in panels):
            caption += (" Hollow markers: true FLOPs/token (routers included) more than 1.05x the dense "
                        "baseline's; the paper's matching rule leaves the router out.")
        self.written += draw(panels, out_dir=self.out_dir, stem=stem, spec=self.spec, caption=caption,
                             metric=self.metric, metric_label=self.ylabel)

    def skip(self, scale: str, what: str, why: str) -> None:
        """One note per (figure, reason) however many scales it applies to (a study has five)."""
        key = f"skipped {what} at "
        for i, note in enumerate(self.notes):
            if note.startswith(key) and note.endswith(f": {why}"):
                self.notes[i] = note[: -len(f": {why}")] + f", {scale}: {why}"
                return
        self.notes.append(f"{key}{scale}: {why}")


def lines(rows: list[dict[str, Any]], key_fn: KeyFn, column: str = "value"
          ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[float]]]:
    """(label -> [(x, y)], label -> [x of the points over the FLOP tolerance]) from ``key_fn(row) = (x, label)``."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    over: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        key = key_fn(r)
        if key is None or r.get(column) is None:
            continue
        series[key[1]].append((key[0], r[column]))
        if flagged(r):
            over[key[1]].append(key[0])
    return dict(series), dict(over)


def panel(title: str, xlabel: str, ylabel: str, rows: list[dict[str, Any]], key_fn: KeyFn, column: str = "value",
          **options: Any) -> Panel:
    series, over = lines(rows, key_fn, column)
    return Panel(title, xlabel, ylabel, series, flagged=over, **options)


def dense_line(rows: list[dict[str, Any]], refs: dict[str, Any], multiple: Any = None, arm: Any = None,
               label: str = "dense baseline") -> dict[str, float]:
    """The dense baseline at the reference budget (and data arm, when dense points have one)."""
    multiple = refs.get("token_multiple") if multiple is None else multiple
    arm = refs.get("data_arm") if arm is None else arm
    for r in rows:
        if r["kind"] == "dense" and r.get("token_multiple") == multiple and r.get("data_arm") in (None, "", arm):
            return {label: r["value"]}
    return {}


def varying(rows: list[dict[str, Any]], settings: list[str]) -> set[str]:
    """The setting axes with more than one value among the MoE rows."""
    moe = [r for r in rows if r.get("kind") == "moe"]
    return {a for a in settings if len({r.get(a) for r in moe}) > 1}


def fixed(refs: dict[str, Any], shown: set[str], free: tuple[str, ...] = ()) -> str:
    """Caption text: the reference value of every setting that varies in the table and this figure holds."""
    parts = []
    for axis, value in refs.items():
        if axis in free or axis not in shown or value in (None, ""):
            continue
        name = _SETTING_NAMES.get(axis) or axis_label(axis)
        parts.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
    return "other axes at the spec's first values: " + ", ".join(parts) if parts else "no other axes vary"


def tokens_label(tokens: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return f"{tokens:,.0f}"

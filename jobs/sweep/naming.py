"""Point names: short, file-name-safe, stable, and naming only what varies in the spec.

``<scale>_<design>[_<axis><value>...][_x<multiple>][_lr<lr>][_seed<seed>]``, e.g.
``a50m_g1-8_s8_aux0.0001_bias0.001``: a design is ``g<granularity>_s<sparsity>``
(``het-...`` for several sets, ``_gen<g_gen>``, ``_cap<factor>[_megablocks]``); an axis
with several values adds its field's first word and the value.
"""

from __future__ import annotations

import re
from fractions import Fraction
from itertools import product
from typing import Any

from jobs.sweep.designs import Design
from jobs.sweep.spec import SweepSpec
from titan_moe.model.args import format_fraction as ff


def frac_tag(value: Fraction) -> str:
    return ff(value).replace("/", "-")


def num_tag(value: float) -> str:
    return f"{value:g}"


def design_tag(design: Design, spec: SweepSpec) -> str:
    """A short, file-name-safe label; knobs that never vary in the spec are left out."""
    if design.heterogeneous:
        parts = [f"g{frac_tag(r.granularity)}s{frac_tag(r.sparsity)}" + (f"w{frac_tag(r.share)}" if r.share else "")
                 for r in design.requests]
        tag = "het-" + "+".join(parts)
    else:
        r = design.requests[0]
        tag = f"g{frac_tag(r.granularity)}_s{frac_tag(r.sparsity)}"
    if design.generalist:
        tag += f"_gen{frac_tag(design.generalist)}"
    if design.routing.mode == "capacity":
        tag += f"_cap{num_tag(design.routing.capacity_factor)}"
        if design.routing.capacity_policy != "priority":
            tag += f"_{design.routing.capacity_policy}"
    return tag


def value_tag(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return num_tag(value)
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value))


def axis_tags(spec: SweepSpec) -> dict[str, str]:
    """Name prefix per swept path (only axes with several values name points): the field's first
    word (``aux_loss_weight`` -> ``aux``), its whole name where two axes share a first word."""
    varied = [p for p, values in spec.axes.items() if len(values) > 1]
    first = {p: p.rsplit(".", 1)[1].split("_")[0] for p in varied}
    return {p: (w if list(first.values()).count(w) == 1 else p.rsplit(".", 1)[1]) for p, w in first.items()}


def axes_tag(values: dict[str, Any], tags: dict[str, str]) -> str:
    return "".join(f"_{tags[p]}{value_tag(v)}" for p, v in values.items() if p in tags)


def axis_combinations(spec: SweepSpec, *, moe: bool) -> list[dict[str, Any]]:
    """Every combination of axis values, in axis order; a dense point skips the ``moe.*`` axes."""
    paths = [p for p in spec.axes if moe or not p.startswith("moe.")]
    return [dict(zip(paths, values)) for values in product(*(spec.axes[p] for p in paths))]


def run_tag(spec: SweepSpec, multiple: float, lr: float, seed: int) -> str:
    tag = ""
    if len(spec.budget.multiples) > 1:
        tag += f"_x{num_tag(multiple)}"
    if any(len(spec.learning_rates_for(s)) > 1 for s in spec.scales):
        tag += f"_lr{num_tag(lr)}"
    if len(spec.seeds) > 1:
        tag += f"_seed{seed}"
    return tag

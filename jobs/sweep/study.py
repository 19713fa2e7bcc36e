"""Planning a study (a spec file with ``parts:``): the union of its parts' plans, in tiers.

Each part is an ordinary spec planned by ``jobs.sweep.plan.build_plan``; every point
carries its part's ``tier``.  Points with the same run config (ignoring where it is
written and its description) are one run: it is kept once, at the lowest tier that
plans it, under that part's name.  A name two different configs share gets its part's
name appended.  ``max_tier`` keeps the points of tiers <= N (``sweep plan --max-tier``).

A plain spec plans the same way with its own ``tier`` (default 1), so the CLI has one
entry point: ``build``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jobs.sweep import fields
from jobs.sweep.plan import COLUMNS, CONFIG_NAME, Plan, Point, build_plan
from jobs.sweep.spec import StudySpec, SweepSpec
from titan_moe.common.errors import ConfigError


def build(spec: SweepSpec | StudySpec, out_dir: str | Path, *, max_tier: int | None = None,
          progress: bool = False) -> Plan:
    """The plan of a spec or a study, cut to ``max_tier``; nothing is written."""
    if max_tier is not None and max_tier < 1:
        raise ConfigError("--max-tier", f"must be >= 1, got {max_tier}")
    if isinstance(spec, SweepSpec):
        plan = build_plan(spec, out_dir, progress=progress)
        if max_tier is not None and spec.tier > max_tier:
            plan.points, plan.invalid = [], []
        return plan
    return _build_study(spec, Path(out_dir).resolve(), max_tier, progress)


def _identity(point: Point) -> str:
    """A run config without the keys that only say where and under which name it runs."""
    config = {k: dict(v) for k, v in point.config.items()}
    config["job"] = {k: v for k, v in config["job"].items() if k not in ("dump_folder", "description")}
    return json.dumps(config, sort_keys=True, default=str)


def _build_study(study: StudySpec, out_dir: Path, max_tier: int | None, progress: bool) -> Plan:
    parts = sorted((p for p in study.parts if max_tier is None or p.tier <= max_tier), key=lambda p: p.tier)
    merged = Plan(study)
    seen: dict[str, Point] = {}
    names: dict[str, str] = {}
    extra: list[str] = []
    for part in tqdm(parts, desc=f"planning {study.name}", unit="part", disable=not progress, leave=False):
        plan = build_plan(part.spec, out_dir, progress=progress)
        extra += [c for c in plan.columns if c not in COLUMNS and c not in extra]
        merged.invalid += plan.invalid
        for point in plan.points:
            key = _identity(point)
            if key in seen:
                continue  # the same run, already planned at this tier or a lower one
            if point.name in names and names[point.name] != key:
                point = _renamed(point, f"{point.name}_{part.spec.name}", out_dir)
            seen[key] = point
            names[point.name] = key
            merged.points.append(point)
    merged.columns = fields.index_columns(extra)
    return merged


def _renamed(point: Point, name: str, out_dir: Path) -> Point:
    config = {k: dict(v) for k, v in point.config.items()}
    config["job"]["dump_folder"] = str(out_dir / "points" / name)
    config["job"]["description"] = config["job"]["description"].rsplit(": ", 1)[0] + f": {name}"
    row: dict[str, Any] = {**point.row, "name": name, "config": f"points/{name}/{CONFIG_NAME}"}
    return Point(name, row, config)

"""``titan-moe sweep plan``: one run config per design point, plus an index.

For every scale the plan holds the dense baseline (the scale's ``[arch]`` with
a plain SwiGLU FFN: FLOP-matched to every MoE of that scale) and every valid
MoE design, each crossed with the budget multiples, learning rates and seeds.
All parameter and FLOP numbers come from ``titan_moe.model.accounting.describe``
(the same numbers ``titan-moe describe`` prints), never from a formula here.

Budget (B = global_batch_size x seq_len tokens per step)::

    tokens_target = tokens_per_param x multiple x N     (or budget.tokens x multiple)
        N = the dense baseline's non-embedding active params (basis: dense, default:
            every point of a scale sees the same tokens) or the point's own (basis: point);
            all active params (embedding and LM head too) with budget.params: active
    steps         = ceil(tokens_target / B)
    tokens        = steps x B                       (what the run actually trains on)
    train_flops   = flops_per_token x tokens
    gpu_hours     = train_flops / (mfu x peak_tflops x 1e12) / 3600

True FLOPs: ``flops_per_token`` is describe's (routers and attention included), so
train_flops and GPU-hours are the true cost, and every row carries
``flops_ratio_vs_dense`` = flops_per_token / its scale's dense baseline's.  The paper's
matching rule (``flop_ratio`` = sum k_i g_i + g_gen = 1) leaves the routers out; points
above ``FLOPS_TOLERANCE`` are reported by ``sweep plan`` (``spec.limits`` can exclude them).

Axes (``spec.axes``, run-config paths) are crossed with every design; ``moe.*`` axes
only with MoE designs.  Each row carries the point's ``tier`` (``spec.tier``).

Equal resources (matching: equal_resources; designs.py has the expert-count rule,
equal_resources.py the budget): every MoE point trains for the dense run's
training FLOPs, in each data arm of ``spec.equal_resources.data_arms`` -- "reuse"
(the dense run's unique tokens, repeated) or "fresh" (the same tokens, all unique);
the index's ``data_arm`` column names it.

Invalid points (non-integral top-k or expert count, non-integral expert width,
an expert count the target ``ep_degree`` does not divide, anything else the
model's config validation refuses) are listed in ``index.json`` and
``invalid.csv`` with the reason, and get no run config.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import product
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from jobs.sweep import equal_resources, fields, tomlw
from jobs.sweep.designs import Design, enumerate_designs, moe_section, structure_section
from jobs.sweep.fields import FLOPS_TOLERANCE
from jobs.sweep.naming import axes_tag, axis_combinations, axis_tags, design_tag, run_tag
from jobs.sweep.spec import ScaleSpec, SweepSpec
from titan_moe.common.errors import ConfigError
from titan_moe.model.accounting import describe
from titan_moe.model.args import TitanMoEModelArgs
from titan_moe.model.args import format_fraction as ff

INDEX_FORMAT = "titan-moe-sweep/1"
CONFIG_NAME = "config.toml"
DONE_MARKER = ".done"

# Index columns, in order: knobs first, then the numbers a reader compares.  They are the
# schema's (``jobs.sweep.fields``): a field added to MoEConfig is a column with no edit here.
# A plan's index.csv adds its swept non-[moe] fields (``index_columns``); collect keeps them.
COLUMNS = fields.index_columns()
INVALID_COLUMNS = ["name", "spec", "tier", "scale", "granularity", "sparsity", "generalist_granularity", "routing",
                   "points_skipped", "reason"]


@dataclass
class Point:
    name: str
    row: dict[str, Any]
    config: dict[str, dict[str, Any]]


@dataclass
class Plan:
    spec: Any
    """The SweepSpec (or a study's StudySpec) the plan was made from."""
    points: list[Point] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=lambda: list(COLUMNS))
    """index.csv's columns: COLUMNS plus the swept fields outside [moe]."""


# --------------------------------------------------------------------------- numbers
class _Describer:
    """``describe`` per distinct (arch, structure): learning rates, seeds, budgets and the
    [moe] knobs that do not change the model's parameters share one count."""

    # Shared by every plan of the process: a study's parts plan the same shapes again.
    cache: dict[str, dict] = {}

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.checked: dict[str, str | None] = {}

    def __call__(self, arch: dict, structure: dict | None) -> dict:
        key = json.dumps([arch, structure, self.seq_len], sort_keys=True)
        if key not in self.cache:
            args = TitanMoEModelArgs.from_sections(arch, structure, self.seq_len)
            self.cache[key] = describe(args, self.seq_len)
        return self.cache[key]

    def problem(self, arch: dict, moe: dict) -> str | None:
        """The model's refusal of a full [moe] table (None when it builds)."""
        key = json.dumps([arch, moe], sort_keys=True)
        if key not in self.checked:
            try:
                TitanMoEModelArgs.from_sections(arch, moe, self.seq_len)
                self.checked[key] = None
            except ConfigError as exc:
                self.checked[key] = str(exc)
        return self.checked[key]


def _target(spec: SweepSpec, d: dict, multiple: float) -> Fraction:
    """The token budget before rounding to whole steps (see the module docstring)."""
    if spec.budget.tokens is not None:
        return spec.budget.tokens * Fraction(str(multiple))
    params = d["active_params" if spec.budget.params == "active" else "non_embedding_active_params"]
    return Fraction(str(spec.budget.tokens_per_param)) * Fraction(str(multiple)) * params


def _steps(tokens: Fraction, batch_tokens: int) -> int:
    return max(1, math.ceil(tokens / batch_tokens))


def _warmup(spec: SweepSpec, steps: int) -> int | None:
    if spec.schedule.warmup_fraction is None:
        return spec.run.get("lr_scheduler", {}).get("warmup_steps")
    return max(1, min(steps, round(spec.schedule.warmup_fraction * steps)))


def _gpu_hours(spec: SweepSpec, train_flops: int) -> float:
    return train_flops / (spec.cluster.mfu * spec.cluster.peak_tflops * 1e12) / 3600.0


# --------------------------------------------------------------------------- the plan
def build_plan(spec: SweepSpec, out_dir: str | Path, *, progress: bool = False) -> Plan:
    """Every point's index row and run config, in memory; nothing is written."""
    out_dir = Path(out_dir).resolve()
    plan = Plan(spec)
    plan.columns = fields.index_columns([fields.axis_column(p) for p in spec.axes])
    describer = _Describer(spec.seq_len)
    designs = enumerate_designs(spec)
    batch_tokens = spec.global_batch_size * spec.seq_len
    tags = axis_tags(spec)
    moe_combos, dense_combos = axis_combinations(spec, moe=True), axis_combinations(spec, moe=False)
    work = [(scale, design) for scale in spec.scales for design in [None, *designs]]
    bar = tqdm(work, desc=f"planning {spec.name}", unit="design", disable=not progress, leave=False)

    for scale, design in bar:
        dense = describer(scale.arch, None)
        lrs = spec.learning_rates_for(scale)
        runs = [(m, lr, seed) for m in spec.budget.multiples for lr in lrs for seed in spec.seeds]
        dense_steps = {m: _steps(_target(spec, dense, m), batch_tokens) for m in spec.budget.multiples}
        if design is None:
            for axes, (m, lr, seed) in product(dense_combos, runs):
                tokens = dense_steps[m] * batch_tokens
                budget = {"tokens_target": _target(spec, dense, m),
                          "steps": dense_steps[m], "tokens": tokens, "unique_tokens": tokens, "repeat": 1.0}
                name = f"{scale.name}_dense" + axes_tag(axes, tags) + run_tag(spec, m, lr, seed)
                plan.points.append(_point(spec, out_dir, name, scale, None, None, axes, dense, dense, budget,
                                          m, lr, seed))
            continue
        tag = f"{scale.name}_{design_tag(design, spec)}"
        reason, d = design.invalid or _ep_problem(design, spec), None
        if reason is None:
            try:
                d = describer(scale.arch, structure_section(design, spec))
            except ConfigError as exc:
                reason = str(exc)
        if reason is None and spec.matching == "flop" and not d["flop_matched"]:
            reason = f"not FLOP-matched: sum k*g + g_gen = {d['flop_ratio']}"  # the model should have refused
        reason = reason or _limit_problem(spec, scale, design, d, dense)
        if reason is not None:
            plan.invalid.append(_invalid_row(tag, spec, scale, design, len(runs) * len(moe_combos), reason))
            continue
        for axes in moe_combos:
            moe = moe_section(design, spec, axes)
            problem = describer.problem(scale.arch, moe)
            if problem is not None:
                plan.invalid.append(_invalid_row(tag + axes_tag(axes, tags), spec, scale, design, len(runs), problem))
                continue
            for (m, lr, seed), arm in product(runs, equal_resources.data_arms(spec)):
                budget = _moe_budget(spec, d, dense, dense_steps[m], m, batch_tokens, arm)
                name = tag + axes_tag(axes, tags) + run_tag(spec, m, lr, seed) + equal_resources.arm_tag(spec, arm)
                plan.points.append(_point(spec, out_dir, name, scale, design, moe, axes, d, dense, budget,
                                          m, lr, seed))

    names = [p.name for p in plan.points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:  # a naming bug would make two points share one directory
        raise ConfigError("spec", f"points with the same name: {', '.join(duplicates)}")
    return plan


def _limit_problem(spec: SweepSpec, scale: ScaleSpec, design: Design, d: dict, dense: dict) -> str | None:
    """Why a valid design is beyond what the study may run (the scale's ``max_sparsity``,
    ``spec.limits``), or None."""
    if scale.max_sparsity is not None:
        if design.sparsity > scale.max_sparsity:
            return (f"sparsity {ff(design.sparsity)} exceeds scale {scale.name}'s max_sparsity "
                    f"{ff(scale.max_sparsity)} (the ladder rung's bound: its anchor on total params)")
    limits = spec.limits
    if limits.max_total_params is not None and d["total_params"] > limits.max_total_params:
        return (f"total params {d['total_params']:,} exceed spec.limits.max_total_params "
                f"{limits.max_total_params:,.0f} (the largest model the study runs)")
    ratio = d["flops_per_token"] / dense["flops_per_token"]
    if limits.max_flops_ratio_vs_dense is not None and ratio > limits.max_flops_ratio_vs_dense:
        return (f"true FLOPs per token {ratio:.3f}x the dense baseline's (routers included) exceed "
                f"spec.limits.max_flops_ratio_vs_dense {limits.max_flops_ratio_vs_dense:g}")
    return None


def _ep_problem(design: Design, spec: SweepSpec) -> str | None:
    ep = spec.cluster.ep_degree
    for i, s in enumerate(design.sets or []):
        if s.num_experts % ep:
            where = f"set {i}: " if len(design.sets) > 1 else ""
            return (f"{where}num_experts {s.num_experts} is not divisible by the target cluster's "
                    f"expert-parallel degree {ep} (spec.cluster.ep_degree)")
    return None


def _moe_budget(spec: SweepSpec, d: dict, dense: dict, dense_steps: int, multiple: float,
                batch_tokens: int, arm: str) -> dict[str, Any]:
    if spec.matching == "flop":
        target = _target(spec, dense if spec.budget.basis == "dense" else d, multiple)
        steps = _steps(target, batch_tokens)
        tokens = steps * batch_tokens
        return {"tokens_target": target, "steps": steps, "tokens": tokens, "unique_tokens": tokens, "repeat": 1.0}
    return equal_resources.moe_budget(d["flops_per_token"], dense["flops_per_token"], dense_steps * batch_tokens,
                                      batch_tokens, arm)


def _invalid_row(name: str, spec: SweepSpec, scale: ScaleSpec, design: Design, skipped: int,
                 reason: str) -> dict[str, Any]:
    return {
        "name": name, "spec": spec.name, "tier": spec.tier, "scale": scale.name,
        "granularity": design.granularity_label, "sparsity": design.sparsity_label,
        "generalist_granularity": ff(design.generalist), "routing": design.routing.label,
        "points_skipped": skipped, "reason": reason,
    }


def _point(spec: SweepSpec, out_dir: Path, name: str, scale: ScaleSpec, design: Design | None, moe: dict | None,
           axes: dict[str, Any], d: dict, dense: dict, budget: dict[str, Any], multiple: float, lr: float,
           seed: int) -> Point:
    point_dir = out_dir / "points" / name
    moe = moe if design else {"enabled": False}
    ep = spec.cluster.ep_degree if design else 1
    steps, tokens = budget["steps"], budget["tokens"]
    warmup = _warmup(spec, steps)
    train_flops = d["flops_per_token"] * tokens
    config = _run_config(spec, point_dir, name, scale, moe, axes, ep, steps, warmup, lr, seed, budget, design)
    sets = design.sets if design else []
    row = {
        "name": name, "spec": spec.name, "tier": spec.tier, "matching": spec.matching, "scale": scale.name,
        "kind": "moe" if design else "dense",
        "heterogeneous": bool(design and design.heterogeneous),
        "granularity": design.granularity_label if design else "",
        "sparsity": design.sparsity_label if design else "",
        "granularity_value": float(design.requests[0].granularity) if design and not design.heterogeneous else None,
        "sparsity_value": float(design.sparsity) if design else None,
        "num_sets": len(sets),
        "num_experts": sum(s.num_experts for s in sets) if design else None,
        "top_k": sum(s.top_k for s in sets) if design else None,
        "expert_sets": "; ".join(f"{s.num_experts}x{ff(s.granularity)} top-{s.top_k}" for s in sets),
        # A heterogeneous design's split of the FFN budget: FLOP shares k*g (flop matching)
        # or parameter shares n*g (equal resources).
        "set_shares": "+".join(ff(s.top_k * s.granularity if spec.matching == "flop" else s.num_experts * s.granularity)
                               for s in sets) if design and design.heterogeneous else "",
        "generalist_granularity": ff(design.generalist) if design else "",
        # every other [moe] field as written into the point's table (blank: not written, or dense)
        **{c: moe.get(c) if design else None for c in fields.moe_columns()},
        "lr": lr, "seed": seed, "token_multiple": multiple, "ep_degree": ep,
        **{fields.axis_column(p): v for p, v in axes.items() if not p.startswith("moe.")},
        "total_params": d["total_params"], "active_params": d["active_params"],
        "embedding_params": d["embedding_params"],
        "non_embedding_active_params": d["non_embedding_active_params"],
        "dense_total_params": dense["total_params"],
        "flops_per_token": d["flops_per_token"], "dense_flops_per_token": dense["flops_per_token"],
        # The truth beside the paper's rule: routers and attention included (describe's count).
        "flops_ratio_vs_dense": d["flops_per_token"] / dense["flops_per_token"],
        "flop_ratio": d["flop_ratio"], "flop_matched": d["flop_matched"],
        "seq_len": spec.seq_len, "global_batch_size": spec.global_batch_size, "steps": steps,
        "warmup_steps": warmup,
        "tokens_target": math.ceil(budget["tokens_target"]), "tokens": tokens,
        "unique_tokens": budget["unique_tokens"], "data_repeat": budget["repeat"],
        "data_arm": budget.get("data_arm", ""),
        "train_flops": train_flops, "gpu_hours": _gpu_hours(spec, train_flops), "mfu": spec.cluster.mfu,
        "config": f"points/{name}/{CONFIG_NAME}",
    }
    return Point(name, row, config)


def _run_config(spec: SweepSpec, point_dir: Path, name: str, scale: ScaleSpec, moe: dict, axes: dict[str, Any],
                ep: int, steps: int, warmup: int | None, lr: float, seed: int, budget: dict[str, Any],
                design: Design | None) -> dict:
    run = copy.deepcopy(spec.run)
    run.pop("moe", None)  # fixed [moe] values are in ``moe`` already (designs.moe_section)
    for path, value in axes.items():  # swept fields outside [moe]; moe.* ones are in ``moe``
        section, _, key = path.partition(".")
        if section != "moe":
            node = run.setdefault(section, {})
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = copy.deepcopy(value)
    doc: dict[str, dict[str, Any]] = {}
    doc["job"] = {**run.pop("job", {}), "dump_folder": str(point_dir),
                  "description": f"sweep {spec.name}: {name}"}
    doc["model"] = {"name": "titan_moe", **run.pop("model", {})}
    doc["arch"] = dict(scale.arch)
    doc["moe"] = moe
    doc["training"] = {**run.pop("training"), "steps": steps}
    doc["optimizer"] = {**run.pop("optimizer", {}), "lr": lr}
    lr_scheduler = run.pop("lr_scheduler", {})
    if warmup is not None:
        lr_scheduler["warmup_steps"] = warmup
    doc["lr_scheduler"] = lr_scheduler
    doc["parallelism"] = {"data_parallel_shard_degree": -1, **run.pop("parallelism", {}), "expert_parallel_degree": ep}
    # collect reads TensorBoard event files, so they are always on.
    doc["metrics"] = {"save_tb_folder": "tb", **run.pop("metrics", {}), "enable_tensorboard": True}
    data = run.pop("data", {})
    if spec.matching == "equal_resources":
        data.update(equal_resources.data_keys(spec, budget, design is not None))
    if data:
        doc["data"] = data
    debug = run.pop("debug", {})
    doc.update(run)  # any other section the spec gives, as it is
    doc["debug"] = {**debug, "seed": seed}
    return doc


# --------------------------------------------------------------------------- writing
def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; configs are read by other users and pods
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buf.getvalue()


def config_text(point: Point, spec: SweepSpec) -> str:
    header = (f"titan-moe sweep '{spec.name}', point {point.name}.\n"
              f"Written by `titan-moe sweep plan`; change the spec and re-plan rather than editing this file.")
    return tomlw.dumps(point.config, header)


def write_plan(plan: Plan, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write every run config, then the index last (atomically): a reader sees all or the old one.

    Re-planning into a directory keeps finished points; it refuses (unless
    ``force``) to change the config of a point that already finished.
    """
    out_dir = Path(out_dir).resolve()
    texts = {p.name: config_text(p, plan.spec) for p in plan.points}
    if not force:
        for name, text in texts.items():
            path = out_dir / "points" / name / CONFIG_NAME
            if (path.parent / DONE_MARKER).exists() and path.exists() and path.read_text() != text:
                raise ConfigError(
                    "--out", f"point {name} in {out_dir} already finished with a different run config; "
                    f"plan into a new directory, or pass --force to replace it",
                )
    for name, text in texts.items():
        atomic_write(out_dir / "points" / name / CONFIG_NAME, text)
    rows = [p.row for p in plan.points]
    index = {
        "format": INDEX_FORMAT, "spec": plan.spec.name, "description": plan.spec.description,
        "matching": plan.spec.matching,
        "cluster": vars(plan.spec.cluster),
        "summary": summary(plan),
        "points": rows, "invalid": plan.invalid,
    }
    atomic_write(out_dir / "spec.yaml", yaml.safe_dump(plan.spec.raw, sort_keys=False))
    atomic_write(out_dir / "invalid.csv", csv_text(plan.invalid, INVALID_COLUMNS))
    atomic_write(out_dir / "index.csv", csv_text(rows, plan.columns))
    atomic_write(out_dir / "index.json", json.dumps(index, indent=1) + "\n")
    return out_dir


def summary(plan: Plan) -> dict[str, Any]:
    rows = [p.row for p in plan.points]
    return {
        "points": len(rows),
        "dense": sum(r["kind"] == "dense" for r in rows),
        "moe": sum(r["kind"] == "moe" for r in rows),
        "invalid_designs": len(plan.invalid),
        "invalid_points": sum(r["points_skipped"] for r in plan.invalid),
        "train_flops": sum(r["train_flops"] for r in rows),
        "gpu_hours": sum(r["gpu_hours"] for r in rows),
        "above_flops_tolerance": len(above_tolerance(plan)),
        "worst_flops_ratio_vs_dense": max((r["flops_ratio_vs_dense"] for r in rows), default=None),
    }


def above_tolerance(plan: Plan) -> list[dict[str, Any]]:
    """The points whose true FLOPs per token exceed their dense baseline's by more than FLOPS_TOLERANCE."""
    return [p.row for p in plan.points if p.row["flops_ratio_vs_dense"] > FLOPS_TOLERANCE]


def load_index(plan_dir: str | Path) -> dict[str, Any]:
    """The index a plan wrote; a clear error when ``plan_dir`` is not a planned sweep."""
    path = Path(plan_dir) / "index.json"
    if not path.is_file():
        raise ConfigError("DIR", f"{plan_dir} has no index.json; run `titan-moe sweep plan SPEC.yaml --out {plan_dir}` first")
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ConfigError("DIR", f"{path} has format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    return index

"""``titan-moe sweep collect DIR``: every point's results in one table (results.csv + results.md).

Per point (its directory is the run's dump folder):

- TensorBoard scalars from every event file under the point directory (the
  trainer writes ``tb/<timestamp>/`` and a resumed run adds another folder;
  ``eval``, ``checkpoint`` and ``data_cache`` folders are left out).  When a
  step was logged twice (a run resumed from a checkpoint before it) the later
  write wins.
- ``train_loss``: mean of the LM-loss values logged in the last 50 steps
  (steps ``> last_step - 50``), from the first tag present of ``LM_LOSS_TAGS``
  (``loss/lm`` is the cross-entropy alone, torchtitan's
  ``loss_metrics/global_avg_loss`` includes the balancing terms); the tag used
  is in ``train_loss_tag``.
- ``val_loss``: the last value of the first tag present of ``VAL_LOSS_TAGS``.
- MoE health: every ``moe/<layer.set>/<metric>`` tag, averaged over the same
  last-50-step window, then the mean (``moe_<metric>``) and the max
  (``moe_<metric>_max``) over layers and sets.
- ``eval.json`` (``titan-moe eval``): ``paloma_macro_ce`` = ``tasks.paloma.macro_ce``
  and ``<task>_accuracy`` = ``tasks.<task>.accuracy``.
- the planned knobs and numbers from ``index.json``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jobs.sweep.launch import EVAL_NAME, FAILED_MARKER
from jobs.sweep.plan import COLUMNS, DONE_MARKER, atomic_write, csv_text, load_index

LM_LOSS_TAGS = ("loss/lm", "loss_metrics/global_avg_loss")
VAL_LOSS_TAGS = ("validation/lm", "validation_metrics/lm_loss", "validation_metrics/loss", "validation/loss")
EXTRA_TAGS = {"loss/aux_total": "aux_loss_term", "mfu(%)": "mfu_pct", "throughput(tps)": "tokens_per_s_per_device"}
WINDOW = 50
SKIP_DIRS = {"eval", "checkpoint", "data_cache", "k8s"}

MARKDOWN_COLUMNS = [
    ("name", "point"), ("granularity", "g"), ("sparsity", "s"), ("num_experts", "n"), ("top_k", "k"),
    ("generalist_granularity", "g_gen"), ("routing", "routing"), ("aux_loss_weight", "aux"),
    ("bias_update_rate", "bias"), ("lr", "lr"), ("seed", "seed"), ("steps", "steps"), ("status", "status"),
    ("train_loss", "train loss"), ("val_loss", "val loss"), ("paloma_macro_ce", "Paloma CE"),
    ("moe_load_imbalance", "load imb."), ("moe_dropped_fraction", "dropped"),
]


def event_files(point_dir: Path) -> list[Path]:
    files = []
    for path in sorted(point_dir.rglob("events.out.tfevents.*")):
        if not SKIP_DIRS.intersection(path.relative_to(point_dir).parts[:-1]):
            files.append(path)
    return files


def read_scalars(point_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file of the point; the latest write of a step wins."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    for path in event_files(point_dir):
        acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every event
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                seen = latest[tag].get(event.step)
                if seen is None or event.wall_time >= seen[0]:
                    latest[tag][event.step] = (event.wall_time, event.value)
    return {tag: {step: v for step, (_, v) in steps.items()} for tag, steps in latest.items()}


def window_mean(series: dict[int, float], window: int = WINDOW) -> tuple[float | None, int]:
    """Mean of the values logged at steps ``> last_step - window``, and how many there were."""
    if not series:
        return None, 0
    last = max(series)
    values = [v for step, v in series.items() if step > last - window and math.isfinite(v)]
    return (sum(values) / len(values), len(values)) if values else (None, 0)


def training_results(scalars: dict[str, dict[int, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in LM_LOSS_TAGS:
        if scalars.get(tag):
            out["train_loss"], out["train_loss_points"] = window_mean(scalars[tag])
            out["train_loss_tag"] = tag
            out["last_step"] = max(scalars[tag])
            break
    for tag in VAL_LOSS_TAGS:
        if scalars.get(tag):
            out["val_loss"] = scalars[tag][max(scalars[tag])]
            out["val_loss_tag"] = tag
            break
    for tag, column in EXTRA_TAGS.items():
        if scalars.get(tag):
            out[column] = window_mean(scalars[tag])[0]
    by_metric: dict[str, list[float]] = defaultdict(list)
    for tag, series in scalars.items():
        if tag.startswith("moe/"):
            value = window_mean(series)[0]
            if value is not None:
                by_metric[tag.rsplit("/", 1)[-1]].append(value)
    for metric, values in sorted(by_metric.items()):
        out[f"moe_{metric}"] = sum(values) / len(values)
        out[f"moe_{metric}_max"] = max(values)
    return out


def eval_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    tasks = json.loads(path.read_text()).get("tasks", {})
    out: dict[str, Any] = {}
    paloma = tasks.get("paloma") or {}
    if paloma.get("macro_ce") is not None:
        out["paloma_macro_ce"] = paloma["macro_ce"]
    for task, result in tasks.items():
        if task != "paloma" and isinstance(result, dict) and result.get("accuracy") is not None:
            out[f"{task}_accuracy"] = result["accuracy"]
    return out


def status(point_dir: Path, has_events: bool) -> str:
    if (point_dir / DONE_MARKER).exists():
        return "done"
    if (point_dir / FAILED_MARKER).exists():
        return "failed"
    return "partial" if has_events else "pending"


def collect(plan_dir: str | Path) -> list[dict[str, Any]]:
    """One row per indexed point: planned knobs + training, eval and MoE-health results."""
    plan_dir = Path(plan_dir)
    index = load_index(plan_dir)
    rows = []
    for planned in tqdm(index["points"], desc="collecting", unit="point", disable=len(index["points"]) < 20):
        point_dir = plan_dir / "points" / planned["name"]
        scalars = read_scalars(point_dir) if point_dir.is_dir() else {}
        row = dict(planned)
        row["status"] = status(point_dir, bool(scalars))
        row.update(training_results(scalars))
        row.update(eval_results(point_dir / EVAL_NAME))
        rows.append(row)
    return rows


def result_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Index columns, then every result column that any row has (in first-seen order)."""
    columns = list(COLUMNS) + ["status"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _cell(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|")


def markdown(rows: list[dict[str, Any]], spec: str) -> str:
    done = sum(r["status"] == "done" for r in rows)
    with_loss = sum(r.get("train_loss") is not None for r in rows)
    lines = [f"# Sweep `{spec}`", "", f"{len(rows)} points, {done} finished, {with_loss} with a training loss "
             f"(mean of the last {WINDOW} steps).", ""]
    for scale in dict.fromkeys(r["scale"] for r in rows):
        lines += [f"## {scale}", "", "| " + " | ".join(h for _, h in MARKDOWN_COLUMNS) + " |",
                  "|" + "|".join("---:" if k not in ("name", "routing", "status") else "---" for k, _ in MARKDOWN_COLUMNS) + "|"]
        for r in rows:
            if r["scale"] == scale:
                lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in MARKDOWN_COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(plan_dir: str | Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    plan_dir = Path(plan_dir)
    rows = collect(plan_dir)
    spec = load_index(plan_dir)["spec"]
    csv_path, md_path = plan_dir / "results.csv", plan_dir / "results.md"
    atomic_write(csv_path, csv_text(rows, result_columns(rows)))
    atomic_write(md_path, markdown(rows, spec))
    return csv_path, md_path, rows

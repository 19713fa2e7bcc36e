"""Run a set of tasks against one model: the python API behind the CLI and the trainer.

    from eval import run_suite, EvalSettings
    results = run_suite(model, tokenizer, EvalSettings(tasks="paloma:c4_en,mmlu_stem_test", data_root=root))

`EvalSettings` is the run config's `[eval]` section, the one definition of
every eval setting (`titan-moe eval`'s flags fill the same object).  `model`
is a `LogitsModel` (or an nn.Module plus max_seq_len/eos_id).  Call it on
every rank together when a process group is up: work is sharded over the
ranks and every rank returns the same dict.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

from eval import distributed as ed
from eval.metrics import perplexity
from eval.models import as_logits_model
from eval.scoring import Request, ScoreStats, rolling_windows, score_requests
from eval.tasks import parse_tasks
from eval.tokenizer import TextTokenizer
from titan_moe.run_config.job_config import EvalSettings


def run_suite(
    model,
    tokenizer: TextTokenizer,
    settings: EvalSettings,
    *,
    max_seq_len: int | None = None,
    eos_id: int | None = None,
    group=None,
    stats: dict[str, ScoreStats] | None = None,
    task_data: dict[str, Path] | None = None,
    progress: bool = True,
    return_examples: bool = False,
) -> dict:
    """Score `settings.tasks`; returns {"tasks": {key: metrics}, "elapsed_s": ..., ["examples": ...]}.

    `task_data` overrides where a task's data is read (paloma: its root); `return_examples`
    adds per-document log-probs as results["examples"].
    """
    settings.validate()
    lm = as_logits_model(model, max_seq_len=max_seq_len, eos_id=eos_id if eos_id is not None else tokenizer.eos_id)
    specs = parse_tasks(settings.tasks)
    # In-loop: eval mode, and the trainer's MoE load counters untouched (see ModuleLogitsModel.scoring).
    scoring = lm.scoring() if hasattr(lm, "scoring") else contextlib.nullcontext()
    run = _Run(lm, tokenizer, settings, group, stats, task_data or {}, progress, [] if return_examples else None)
    out: dict = {"tasks": {}}
    t0 = time.perf_counter()
    with scoring:
        for spec in specs:
            if spec.kind == "paloma":
                out["tasks"]["paloma"] = _run_paloma(run, spec.subsets)
            else:
                from eval.olmo_tasks import run_olmo_task

                out["tasks"][spec.name] = run_olmo_task(
                    lm, tokenizer, spec.name, limit=settings.limit or None, batch_tokens=settings.batch_tokens,
                    max_batch_size=settings.max_batch_size, progress=progress, group=group, stats=stats,
                )  # fmt: skip
    out["elapsed_s"] = time.perf_counter() - t0
    if run.examples is not None:
        out["examples"] = run.examples
    return out


class _Run:
    """What every task of one `run_suite` call shares."""

    def __init__(self, lm, tokenizer, settings, group, stats, task_data, progress, examples):
        self.lm, self.tokenizer, self.settings, self.group, self.stats = lm, tokenizer, settings, group, stats
        self.task_data, self.progress, self.examples = task_data, progress, examples


def empty_tasks(results: dict) -> list[str]:
    """Tasks (and Paloma subsets) that ended with zero scored examples: a run that must not pass."""
    empty = []
    for key, entry in results["tasks"].items():
        if key == "paloma":
            empty += [f"paloma/{name}" for name, s in entry["subsets"].items() if not s.get("documents")]
        elif not entry.get("n"):
            empty.append(key)
    return empty


# -- Paloma ---------------------------------------------------------------------


def _run_paloma(run: _Run, subset_names: list[str] | None) -> dict:
    from eval.tasks.paloma import load_subset, paloma_root, select_subsets

    cfg, lm, group, stats = run.settings, run.lm, run.group, run.stats
    root = paloma_root(Path(cfg.data_root) if cfg.data_root else None, run.task_data.get("paloma"))
    subsets: dict[str, dict] = {}
    show = run.progress and ed.rank(group) == 0
    for name in select_subsets(subset_names):
        docs, report = load_subset(
            name, root, run.tokenizer, split=cfg.paloma_split, limit=cfg.limit or None, progress=show,
            dtype=cfg.paloma_dtype or None,
        )
        if report.document_split and show:
            print(f"paloma {name}: documents split by {report.document_split}", file=sys.stderr, flush=True)
        requests: list[Request] = []
        owner: list[int] = []
        for d, doc in enumerate(docs):
            windows = rolling_windows(doc.tokens, lm.eos_id, lm.max_seq_len)
            requests += windows
            owner += [d] * len(windows)
        sub_stats = ScoreStats()
        logprobs = score_requests(
            lm, requests, batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size,
            progress=run.progress, desc=f"paloma {name}", group=group, stats=sub_stats,
        )  # fmt: skip
        if stats is not None:
            stats[f"paloma/{name}"] = sub_stats
        doc_lp = [0.0] * len(docs)
        for d, lp in zip(owner, logprobs):  # windows of a document are consecutive: fixed order
            doc_lp[d] += lp
        entry = perplexity(
            math.fsum(doc_lp), sum(len(d.tokens) for d in docs), sum(d.n_bytes for d in docs), len(docs)
        )
        entry.update(report.as_dict())
        subsets[name] = entry
        if run.examples is not None:
            run.examples += [
                {"task": f"paloma/{name}", "id": doc.id, "logprob": lp, "tokens": len(doc.tokens), "bytes": doc.n_bytes}
                for doc, lp in zip(docs, doc_lp)
            ]
    ces = [s["ce"] for s in subsets.values() if s["ce"] is not None]
    bpbs = [s["bits_per_byte"] for s in subsets.values() if s["bits_per_byte"] is not None]
    return {
        "subsets": subsets,
        "macro_ce": sum(ces) / len(ces) if ces else None,
        "macro_bits_per_byte": sum(bpbs) / len(bpbs) if bpbs else None,
        "split": cfg.paloma_split,
        "skipped": sum(s["skipped"] for s in subsets.values()),
    }

"""Run a set of tasks against one model: the python API behind the CLI and the trainer.

    from eval import run_suite, SuiteConfig
    results = run_suite(model, tokenizer, "paloma:c4_en,mmlu", config=SuiteConfig(data_root=root))

`model` is a `LogitsModel` (or an nn.Module plus max_seq_len/eos_id).  Call it
on every rank together when a process group is up: work is sharded over the
ranks and every rank returns the same dict.
"""

from __future__ import annotations

import contextlib
import sys
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from eval import distributed as ed
from eval.metrics import QuestionResult, aggregate, perplexity, score_question
from eval.models import LogitsModel, as_logits_model
from eval.scoring import Request, ScoreStats, rolling_windows, score_requests
from eval.tasks import TaskSpec, downstream_task, parse_tasks
from eval.tasks.multiple_choice import MultipleChoiceTask, TaskData
from eval.tasks.records import LoadReport
from eval.tokenizer import TextTokenizer


@dataclass
class SuiteConfig:
    """Everything about *how* to evaluate, apart from the model and the task list."""

    data_root: Path | None = None  # holds boolq/, hails/mmlu_no_train/, paloma/ ...
    task_data: dict[str, Path] = field(default_factory=dict)  # per-task override: a split dir or JSONL
    shots: tuple[int, ...] = (0,)  # downstream few-shot settings to run
    limit: int | None = None  # first N questions (per MMLU subject) / documents (per Paloma subset)
    batch_tokens: int = 16384  # rows x padded length per forward pass
    max_batch_size: int = 64
    mmlu_format: str = "cloze"  # or "mc"
    mmlu_split: str = "validation"
    paloma_split: str = "val"
    paloma_dtype: str | None = None  # raw token files without a header or JSON sidecar: "uint16" / "uint32"
    allow_hub: bool | None = None  # None: allowed unless HF offline mode is set
    progress: bool = True
    return_examples: bool = False  # per-question LLs / per-document log-probs in results["examples"]


def task_key(name: str, shots: int) -> str:
    return name if shots == 0 else f"{name}_{shots}shot"


def run_suite(
    model,
    tokenizer: TextTokenizer,
    tasks: str | list[str] | list[TaskSpec],
    *,
    config: SuiteConfig | None = None,
    max_seq_len: int | None = None,
    eos_id: int | None = None,
    group=None,
    stats: dict[str, ScoreStats] | None = None,
) -> dict:
    """Score `tasks`; returns {"tasks": {key: metrics}, "elapsed_s": ..., ["examples": ...]}."""
    cfg = config or SuiteConfig()
    lm = as_logits_model(model, max_seq_len=max_seq_len, eos_id=eos_id if eos_id is not None else tokenizer.eos_id)
    specs = tasks if tasks and isinstance(tasks[0], TaskSpec) else parse_tasks(tasks)
    # In-loop: eval mode, and the trainer's MoE load counters untouched (see ModuleLogitsModel.scoring).
    scoring = lm.scoring() if hasattr(lm, "scoring") else contextlib.nullcontext()
    out: dict = {"tasks": {}}
    examples: list[dict] = []
    t0 = time.perf_counter()
    with scoring:
        for spec in specs:
            if spec.kind == "paloma":
                out["tasks"]["paloma"] = _run_paloma(lm, tokenizer, spec, cfg, group, stats, examples)
            elif spec.kind == "olmo":
                from eval.olmo_tasks import run_olmo_task

                out["tasks"][spec.name] = run_olmo_task(
                    lm, tokenizer, spec.name, limit=cfg.limit, batch_tokens=cfg.batch_tokens,
                    max_batch_size=cfg.max_batch_size, progress=cfg.progress, group=group, stats=stats,
                )  # fmt: skip
            else:
                out["tasks"].update(_run_downstream(lm, tokenizer, spec, cfg, group, stats, examples))
    out["elapsed_s"] = time.perf_counter() - t0
    if cfg.return_examples:
        out["examples"] = examples
    return out


def empty_tasks(results: dict) -> list[str]:
    """Tasks (and Paloma subsets) that ended with zero scored examples: a run that must not pass."""
    empty = []
    for key, entry in results["tasks"].items():
        if key == "paloma":
            empty += [f"paloma/{name}" for name, s in entry["subsets"].items() if not s.get("documents")]
        elif not entry.get("n"):
            empty.append(key)
    return empty


# -- downstream -----------------------------------------------------------------


def _run_downstream(lm, tokenizer, spec, cfg, group, stats, examples) -> dict:
    """A hand-written (legacy_*) task: its own prompts and metrics."""
    task: MultipleChoiceTask = downstream_task(spec.base, cfg.mmlu_format)
    split = cfg.mmlu_split if spec.base == "mmlu" else task.eval_split
    need_shots = max(cfg.shots) > 0
    loaded: dict[str | None, TaskData] = {}
    for g in task.groups(spec.subsets):
        loaded[g] = task.load(
            g,
            data_root=cfg.data_root,
            override=cfg.task_data.get(spec.name, cfg.task_data.get(spec.base)),
            split=split,
            need_shots=need_shots,
            allow_hub=cfg.allow_hub,
            limit=cfg.limit,
        )
    report = LoadReport()
    for data in loaded.values():
        report.merge(data.report)
    cont_cache: dict[str, tuple[int, ...]] = {}
    for data in loaded.values():
        data.questions = _drop_unscorable(data.questions, tokenizer, lm.max_seq_len, cont_cache, report)
    results: dict[str, dict] = {}
    for k in cfg.shots:
        key = task_key(spec.name, k)
        questions = [(data, i, q) for data in loaded.values() for i, q in enumerate(data.questions)]
        contexts = [task.context(q, task.shots_for(data, i, k)) for data, i, q in questions]
        ctx_ids = tokenizer.encode_batch(contexts) if contexts else []
        requests, owners = [], []
        for qi, ((_, _, q), ids) in enumerate(zip(questions, ctx_ids)):
            context = tuple(ids) or (lm.eos_id,)  # an empty context still needs a token to predict from
            for choice in q.choices:
                requests.append(Request(context, cont_cache[choice]))
                owners.append(qi)
        task_stats = ScoreStats()
        lls = score_requests(
            lm, requests, batch_tokens=cfg.batch_tokens, max_batch_size=cfg.max_batch_size,
            progress=cfg.progress, desc=key, group=group, stats=task_stats,
        )  # fmt: skip
        if stats is not None:
            stats[key] = task_stats
        per_q: list[list[float]] = [[] for _ in questions]
        for qi, ll in zip(owners, lls):
            per_q[qi].append(ll)
        scored = [score_question(q.id, q.group, per_q[qi], q.choices, q.gold) for qi, (_, _, q) in enumerate(questions)]
        entry = aggregate(scored)
        entry["num_fewshot"] = k
        if k:
            first = next(iter(loaded.values()))
            entry["shots_from"] = (
                f"{split} split (the question itself excluded)" if first.shots_from_eval_split else task.shot_split
            )
        if spec.base == "mmlu":
            entry.update(_mmlu_breakdown(scored))
            entry["prompt_format"] = cfg.mmlu_format
        entry["split"] = split
        entry.update(report.as_dict())
        results[key] = entry
        if cfg.return_examples:
            examples += [
                {"task": key, "id": r.id, "group": r.group, "lls": r.lls, "gold": r.gold, "pred": r.pred,
                 "pred_per_char": r.pred_per_char}
                for r in scored
            ]  # fmt: skip
    return results


def _drop_unscorable(questions, tokenizer, max_seq_len, cont_cache, report: LoadReport):
    """Tokenize every answer once; skip (and report) questions with an answer longer than the context."""
    kept = []
    for q in questions:
        for choice in q.choices:
            if choice not in cont_cache:
                cont_cache[choice] = tuple(tokenizer.encode(choice))
        lengths = [len(cont_cache[c]) for c in q.choices]
        if max(lengths) > max_seq_len or min(lengths) == 0:
            i = max(range(len(lengths)), key=lambda j: lengths[j]) if max(lengths) > max_seq_len else lengths.index(0)
            report.skip(q.id, f"answer {i} has {lengths[i]} tokens; must be 1..{max_seq_len} (the model context)")
            continue
        kept.append(q)
    return kept


def _mmlu_breakdown(scored: list[QuestionResult]) -> dict:
    from eval.tasks.mmlu import CATEGORIES, CATEGORY_OF

    by_subject: dict[str, list[QuestionResult]] = {}
    for r in scored:
        by_subject.setdefault(r.group, []).append(r)
    categories = {}
    for cat in CATEGORIES:
        members = [r for r in scored if CATEGORY_OF.get(r.group) == cat]
        if members:
            categories[cat] = aggregate(members)
    return {
        "categories": categories,
        "subjects": {s: aggregate(rs) for s, rs in sorted(by_subject.items())},
        "category_mapping": "OLMo/Hendrycks (anatomy in other)",
    }


# -- Paloma ---------------------------------------------------------------------


def _run_paloma(lm: LogitsModel, tokenizer, spec, cfg, group, stats, examples) -> dict:
    from eval.tasks.paloma import load_subset, paloma_root, select_subsets

    root = paloma_root(cfg.data_root, cfg.task_data.get("paloma"))
    subsets: dict[str, dict] = {}
    show = cfg.progress and ed.rank(group) == 0
    for name in select_subsets(spec.subsets):
        docs, report = load_subset(
            name, root, tokenizer, split=cfg.paloma_split, limit=cfg.limit, progress=show, dtype=cfg.paloma_dtype
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
            progress=cfg.progress, desc=f"paloma {name}", group=group, stats=sub_stats,
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
        if cfg.return_examples:
            examples += [
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

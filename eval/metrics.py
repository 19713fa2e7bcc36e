"""Turning log-likelihoods into the numbers in the report.

Downstream (per question, then averaged over questions):
- accuracy: the continuation with the highest log-likelihood is the gold one;
- accuracy_per_char: the same after dividing each LL by the continuation's
  character length *including* its leading space (lm-evaluation-harness'
  acc_norm; REFERENCE.md);
- ce_per_char: `-LL(gold) / len(gold answer)`, the answer's characters
  *without* the leading space (OLMo's convention).
Ties go to the first continuation, like numpy's argmax.

Paloma (per subset, token-weighted): CE = -sum LL / tokens (nats/token),
PPL = exp(CE), bits/byte = -sum LL / (UTF-8 bytes * ln 2); across subsets
the plain mean of CE (macro_ce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def answer_chars(continuation: str) -> int:
    """Characters of the answer itself: the leading space is a separator, not answer."""
    return max(1, len(continuation[1:] if continuation.startswith(" ") else continuation))


@dataclass
class QuestionResult:
    id: str
    group: str | None
    lls: list[float]
    gold: int
    pred: int
    pred_per_char: int
    ce_per_char: float


def score_question(qid: str, group: str | None, lls: list[float], choices: list[str], gold: int) -> QuestionResult:
    per_char = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]
    return QuestionResult(
        id=qid,
        group=group,
        lls=list(lls),
        gold=gold,
        pred=_argmax(lls),
        pred_per_char=_argmax(per_char),
        ce_per_char=-lls[gold] / answer_chars(choices[gold]),
    )


def aggregate(results: list[QuestionResult]) -> dict:
    n = len(results)
    if n == 0:
        return {"accuracy": None, "accuracy_per_char": None, "ce_per_char": None, "n": 0}
    return {
        "accuracy": sum(r.pred == r.gold for r in results) / n,
        "accuracy_per_char": sum(r.pred_per_char == r.gold for r in results) / n,
        "ce_per_char": math.fsum(r.ce_per_char for r in results) / n,
        "n": n,
    }


def perplexity(sum_logprob: float, tokens: int, n_bytes: int, documents: int) -> dict:
    if tokens == 0:
        return {"ce": None, "ppl": None, "bits_per_byte": None, "tokens": 0, "documents": documents, "bytes": n_bytes}
    ce = -sum_logprob / tokens
    return {
        "ce": ce,
        "ppl": math.exp(ce),
        "bits_per_byte": -sum_logprob / (n_bytes * math.log(2)) if n_bytes else None,
        "tokens": tokens,
        "documents": documents,
        "bytes": n_bytes,
    }

"""Turning Paloma log-likelihoods into the numbers in the report
(downstream metrics are ai2-olmo-eval's ICLMetric, see eval.olmo_tasks).

Paloma (per subset, token-weighted): CE = -sum LL / tokens (nats/token),
PPL = exp(CE), bits/byte = -sum LL / (UTF-8 bytes * ln 2); across subsets
the plain mean of CE (macro_ce).
"""

from __future__ import annotations

import math


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

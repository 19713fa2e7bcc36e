"""Budgets and data arms of the equal-resources mode (``matching: equal_resources``).

"Can Mixture-of-Experts Surpass Dense LLMs Under Strictly Equal Resources?"
compares an MoE with its dense model at equal total parameters (``designs.py``:
the dense FFN split into ``n`` experts), equal training compute and equal data.
Equal compute makes the MoE train on more tokens than the dense run (it spends
fewer FLOPs per token); the data arm says where those tokens come from::

    dense:  tokens_dense (spec.budget); unique = tokens_dense; no repeat
    MoE:    steps  = round(flops_per_token_dense x tokens_dense / (flops_per_token_moe x B))
            tokens = steps x B                     (equal training FLOPs up to half a step)
      reuse (the paper's equal-data setting): unique = tokens_dense, each source repeated
            tokens / tokens_dense epochs ([data].repeat), [data].token_budget = tokens, so
            the loader shrinks the unique pool to tokens_dense
      fresh (the control: what reuse costs): unique = tokens, no repeat,
            [data].token_budget = tokens

B is the global batch in tokens.  The dense baseline is shared by both arms (its
``data_arm`` is empty).  ``spec.equal_resources.data_arms`` picks the arms.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from jobs.sweep.spec import SweepSpec


def data_arms(spec: SweepSpec) -> list[str]:
    """The data arms each MoE design is planned in; one unnamed arm outside equal resources."""
    return list(spec.equal_resources.data_arms) if spec.matching == "equal_resources" else [""]


def arm_tag(spec: SweepSpec, arm: str) -> str:
    """The point-name suffix of an arm: only when the spec plans more than one."""
    return f"_{arm}" if arm and len(spec.equal_resources.data_arms) > 1 else ""


def moe_budget(flops_per_token: int, dense_flops_per_token: int, dense_tokens: int, batch_tokens: int,
               arm: str) -> dict[str, Any]:
    """Steps, tokens and unique tokens of an MoE point at the dense run's training FLOPs."""
    target = Fraction(dense_flops_per_token * dense_tokens, flops_per_token)
    steps = max(1, round(target / batch_tokens))
    tokens = steps * batch_tokens
    unique = dense_tokens if arm == "reuse" else tokens
    return {"tokens_target": target, "steps": steps, "tokens": tokens, "unique_tokens": unique,
            "repeat": tokens / unique, "data_arm": arm}


def data_keys(spec: SweepSpec, budget: dict[str, Any], is_moe: bool) -> dict[str, Any]:
    """The ``[data]`` keys the equal-resources mode writes into a point's run config."""
    keys: dict[str, Any] = {"token_budget": budget["tokens"]}
    if is_moe and budget.get("data_arm") == "reuse":
        keys["repeat"] = {source: budget["repeat"] for source in spec.equal_resources.sources}
    return keys

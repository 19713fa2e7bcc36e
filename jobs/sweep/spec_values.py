"""Checks of single spec values, each raising ``ConfigError`` naming the field and the fix.

Shared by ``jobs.sweep.spec_check`` (the spec's sections) and ``jobs.sweep.spec_axes``
(run-config values and axes).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from titan_moe.common.errors import ConfigError
from titan_moe.model.args import format_fraction, parse_fraction


def mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a mapping, got {value!r}")
    return value


def no_unknown(section: dict[str, Any], known: set[str], name: str) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown key; valid keys: {', '.join(sorted(known))}")


def as_list(value: Any, name: str, *, allow_empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        value = [value]
    if not value and not allow_empty:
        raise ConfigError(name, "must list at least one value")
    return value


def number(value: Any, name: str, *, minimum: float | None = None, above: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be >= {minimum:g}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(name, f"must be > {above:g}, got {value!r}")
    return float(value)


def integer(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def distinct(values: list[Any], name: str, show=str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ConfigError(name, f"lists {show(value)} twice; each value makes its own points")
        seen.add(value)


def check_granularity(value: Any, name: str, *, allow_zero: bool = False) -> Fraction:
    g = parse_fraction(value, name)
    low_ok = g >= 0 if allow_zero else g > 0
    if not low_ok or g > 1 or (allow_zero and g == 1):
        bound = "0 <= g_gen < 1" if allow_zero else "0 < g <= 1"
        raise ConfigError(name, f"{format_fraction(g)} is out of range; need {bound} (a fraction of ffn_hidden)")
    return g


def check_sparsity(value: Any, name: str) -> Fraction:
    s = parse_fraction(value, name)
    if s < 1:
        raise ConfigError(name, f"sparsity n/k = {format_fraction(s)} must be >= 1")
    return s

"""Repeats, ratios and intervals: how every benchmark turns noisy timings into a verdict.

One method, used by ``titan-moe bench``, ``gpu-check``'s bench stage and the
``benchmarks/`` scripts:

1. **Interleave** the things compared (A B A B ...), so whatever else the
   machine does drifts over both alike instead of landing on one of them
   (:func:`interleave`).
2. **Pair** the repeats: repeat i of A against repeat i of B gives one ratio;
   the ratios are what is summarised (:func:`ratio_interval`), not two
   separately summarised sides, so a slow stretch that hits a pair cancels.
3. **Median with an order-statistic interval.**  For n independent ratios the
   interval between the k-th smallest and the k-th largest holds the true
   median ratio with probability ``1 - 2 P(Binomial(n, 1/2) < k)``, whatever
   the distribution of the noise.  We take the narrowest such interval whose
   coverage is at least :data:`MIN_COVERAGE` (90 %): for 5 to 7 repeats that
   is min..max (93.8 %, 96.9 %, 98.4 %), from 8 repeats the second smallest to
   the second largest, and so on.  A bootstrap interval was the alternative;
   at 5 to 10 pairs it resamples the same few values, its coverage is
   unknown and it is narrower than the data justify, so it is not used.
4. **Verdict** against a target ratio: ``faster`` when the whole interval is
   at or above it, ``slower`` when the whole interval is below it,
   ``inconclusive`` when it straddles the target or when there are too few
   repeats for a 90 % interval (fewer than 5).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MIN_COVERAGE = 0.90
MIN_REPEATS_FOR_VERDICT = 5  # the fewest repeats whose min..max reaches MIN_COVERAGE
VERDICTS = ("faster", "slower", "inconclusive")


def interleave(runners: Mapping[str, Callable[[int], T]], repeats: int,
               after_repeat: Callable[[int, dict[str, T]], None] | None = None) -> dict[str, list[T]]:
    """Call each runner once per repeat, in the mapping's order, repeat after repeat (A B A B ...).

    ``runners[name](i)`` measures repeat ``i``; ``after_repeat(i, {name: result})``
    sees each finished repeat (a progress line).  Returns each name's results in
    repeat order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    results: dict[str, list[T]] = {name: [] for name in runners}
    for i in range(repeats):
        for name, run in runners.items():
            results[name].append(run(i))
        if after_repeat is not None:
            after_repeat(i, {name: values[-1] for name, values in results.items()})
    return results


def median_coverage(n: int, k: int) -> float:
    """Probability that [k-th smallest, k-th largest] of n samples holds the population median."""
    tail = sum(math.comb(n, i) for i in range(k)) / 2**n
    return 1 - 2 * tail


def interval_rank(n: int, min_coverage: float = MIN_COVERAGE) -> int:
    """The largest k whose order-statistic interval still covers the median with ``min_coverage`` (1 if none)."""
    k = 1
    while k + 1 <= (n + 1) // 2 and median_coverage(n, k + 1) >= min_coverage:
        k += 1
    return k


@dataclass(frozen=True)
class Interval:
    """The median of n values and a distribution-free interval around it."""

    n: int
    median: float
    low: float
    high: float
    coverage: float  # probability that [low, high] holds the true median
    minimum: float
    maximum: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median_interval(values: Sequence[float], min_coverage: float = MIN_COVERAGE) -> Interval:
    if not values:
        raise ValueError("no values to summarise")
    ordered = sorted(values)
    n = len(ordered)
    k = interval_rank(n, min_coverage)
    return Interval(n=n, median=statistics.median(ordered), low=ordered[k - 1], high=ordered[n - k],
                    coverage=median_coverage(n, k), minimum=ordered[0], maximum=ordered[-1])


@dataclass(frozen=True)
class RatioSummary:
    """Per-pair ratios of two interleaved series and their median interval."""

    ratios: tuple[float, ...]
    interval: Interval

    @property
    def median(self) -> float:
        return self.interval.median

    @property
    def low(self) -> float:
        return self.interval.low

    @property
    def high(self) -> float:
        return self.interval.high

    def as_dict(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios)} | self.interval.as_dict()


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float],
                   min_coverage: float = MIN_COVERAGE) -> RatioSummary:
    """Ratio of repeat i of one side to repeat i of the other, for every i; median and interval of those."""
    if len(numerators) != len(denominators):
        raise ValueError(f"unpaired repeats: {len(numerators)} vs {len(denominators)}")
    if any(d <= 0 for d in denominators):
        raise ValueError(f"a denominator is not positive: {list(denominators)}")
    ratios = tuple(a / b for a, b in zip(numerators, denominators))
    return RatioSummary(ratios=ratios, interval=median_interval(ratios, min_coverage))


def verdict(interval: Interval, target: float, min_coverage: float = MIN_COVERAGE) -> str:
    """``faster`` / ``slower`` than ``target``, or ``inconclusive`` (straddles it, or too few repeats)."""
    if interval.coverage < min_coverage:
        return "inconclusive"
    if interval.low >= target:
        return "faster"
    if interval.high < target:
        return "slower"
    return "inconclusive"


def describe_interval(interval: Interval, unit: str = "x") -> str:
    """``1.18x (1.09-1.25, 94% interval, 5 repeats)``: the median, its interval and how sure."""
    return (f"{interval.median:.3g}{unit} ({interval.low:.3g}-{interval.high:.3g}{unit}, "
            f"{interval.coverage:.0%} interval, {interval.n} repeat{'s' if interval.n != 1 else ''})")


def describe_verdict(ratio: RatioSummary, target: float, what: str = "ratio") -> str:
    """One line: the verdict and why, e.g. ``faster: the whole interval is >= 1.1x``."""
    v = verdict(ratio.interval, target)
    if v == "faster":
        why = f"the whole interval is >= {target:g}x"
    elif v == "slower":
        why = f"the whole interval is < {target:g}x"
    elif ratio.interval.coverage < MIN_COVERAGE:
        why = (f"{ratio.interval.n} repeats are too few for a {MIN_COVERAGE:.0%} interval, "
               f"need >= {MIN_REPEATS_FOR_VERDICT}")
    else:
        why = f"the interval straddles {target:g}x"
    return f"{what} {describe_interval(ratio.interval)}; verdict vs {target:g}x: {v} ({why})"

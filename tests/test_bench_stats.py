"""The statistics every benchmark shares: paired ratios, the median's order-statistic interval, the verdict."""

import pytest

from titan_moe.common.bench_stats import (describe_verdict, interleave, interval_rank, median_coverage, median_interval,
                                   ratio_interval, verdict)


def test_coverage_of_order_statistic_intervals_by_hand():
    # P(median outside min..max of n) = 2 * (1/2)^n.
    assert median_coverage(5, 1) == pytest.approx(1 - 2 / 32)  # 0.9375
    assert median_coverage(4, 1) == pytest.approx(1 - 2 / 16)  # 0.875: below 90 %
    # 2nd smallest..2nd largest of 8: 1 - 2 * (C(8,0) + C(8,1)) / 2^8 = 1 - 18/256.
    assert median_coverage(8, 2) == pytest.approx(1 - 18 / 256)
    # The narrowest interval still >= 90 %: min..max up to 7 repeats, then one in from each end.
    assert [interval_rank(n) for n in (1, 2, 4, 5, 6, 7, 8, 10, 12)] == [1, 1, 1, 1, 1, 1, 2, 2, 3]
    # 12 repeats, k=3: 1 - 2 * (1 + 12 + 66) / 4096.
    assert median_coverage(12, 3) == pytest.approx(1 - 158 / 4096)


def test_ratio_median_and_interval_on_fixed_timings():
    ours = [1300.0, 1200.0, 1320.0, 1100.0, 1250.0]
    base = [1000.0, 1000.0, 1100.0, 1000.0, 1000.0]
    summary = ratio_interval(ours, base)
    # Per pair: 1.3, 1.2, 1.2, 1.1, 1.25 -> sorted 1.1, 1.2, 1.2, 1.25, 1.3.
    assert summary.ratios == pytest.approx((1.3, 1.2, 1.2, 1.1, 1.25))
    assert (summary.median, summary.low, summary.high) == pytest.approx((1.2, 1.1, 1.3))
    assert summary.interval.coverage == pytest.approx(0.9375)
    assert verdict(summary.interval, 1.1) == "faster"  # the low end equals the target: cleared
    assert verdict(summary.interval, 1.35) == "slower"


def test_pairs_are_ratioed_before_the_median_not_after():
    # Two slow stretches each hit one pair: per-pair ratios stay 1.2, medians of each side would not.
    ours = [120.0, 60.0, 120.0, 30.0, 120.0, 120.0]
    base = [100.0, 50.0, 100.0, 25.0, 100.0, 100.0]
    summary = ratio_interval(ours, base)
    assert (summary.median, summary.low, summary.high) == pytest.approx((1.2, 1.2, 1.2))


def test_eight_repeats_drop_one_value_at_each_end():
    values = [5.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0]
    interval = median_interval(values)
    assert (interval.median, interval.low, interval.high) == (4.5, 2.0, 7.0)
    assert (interval.minimum, interval.maximum) == (1.0, 8.0)


def test_interval_straddling_the_target_is_inconclusive():
    ours = [1050.0, 1150.0, 1120.0, 1080.0, 1200.0]
    base = [1000.0] * 5  # ratios 1.05 .. 1.20 around a 1.1 target
    summary = ratio_interval(ours, base)
    assert summary.median == pytest.approx(1.12)
    assert verdict(summary.interval, 1.1) == "inconclusive"
    line = describe_verdict(summary, 1.1)
    assert "inconclusive (the interval straddles 1.1x)" in line
    assert "1.12x (1.05-1.2x, 94% interval, 5 repeats)" in line


def test_too_few_repeats_give_no_verdict_even_when_all_clear_the_target():
    summary = ratio_interval([150.0, 160.0, 155.0], [100.0, 100.0, 100.0])
    assert summary.low == pytest.approx(1.5)
    assert summary.interval.coverage == pytest.approx(0.75)
    assert verdict(summary.interval, 1.1) == "inconclusive"
    assert "3 repeats are too few for a 90% interval, need >= 5" in describe_verdict(summary, 1.1)


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="unpaired repeats: 2 vs 1"):
        ratio_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="not positive"):
        ratio_interval([1.0], [0.0])


def test_interleave_runs_a_b_a_b_and_reports_each_repeat():
    calls, seen = [], []

    def runner(name):
        def run(i):
            calls.append((name, i))
            return f"{name}{i}"
        return run

    out = interleave({"A": runner("A"), "B": runner("B")}, 3, after_repeat=lambda i, r: seen.append((i, r)))
    assert calls == [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A", 2), ("B", 2)]
    assert out == {"A": ["A0", "A1", "A2"], "B": ["B0", "B1", "B2"]}
    assert seen == [(0, {"A": "A0", "B": "B0"}), (1, {"A": "A1", "B": "B1"}), (2, {"A": "A2", "B": "B2"})]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleave({"A": runner("A")}, 0)

"""The mixture plan and the global sample order (pure functions; no I/O)."""

from __future__ import annotations

import numpy as np
import pytest

from titan_moe.data.config import DataConfig
from titan_moe.data.manifest import StreamInfo
from titan_moe.data.mixture import MixturePlan, SourcePlan, apportion, plan_mixture
from titan_moe.data.order import SampleOrder
from titan_moe.common.errors import ConfigError
from titan_moe.common.units import parse_bytes


def stream(name: str, shards: list[int]) -> StreamInfo:
    return StreamInfo(name, f"/x/{name}", sum(shards), 0, 0.0, tuple(shards), ())


STREAMS = {"a": stream("a", [50] * 7 + [13]), "b": stream("b", [40, 40, 7]), "c": stream("c", [5])}


def plan(seq_len: int = 4, **data) -> MixturePlan:
    return plan_mixture(DataConfig(root="/x", **data), STREAMS, seq_len)


def order(p: MixturePlan, seed: int = 17, window: int = 32, block: int = 16) -> SampleOrder:
    return SampleOrder(p, {n: s.shard_samples for n, s in STREAMS.items()}, seed, window, block)


def test_apportion_is_largest_remainder_with_exact_sum():
    # Quotas 4.29/4.29/1.43 -> floors 4,4,1, the spare sample to the largest remainder.
    assert apportion(10, [6, 6, 2]) == [4, 4, 2]
    assert apportion(11, [6, 6, 2]) == [5, 5, 1]
    assert apportion(7, [1, 1, 1]) == [3, 2, 2]  # ties go to the earlier source
    assert sum(apportion(1000003, [0.948, 0.025, 0.014, 0.0052, 0.0031, 0.0031, 0.0009])) == 1000003


def test_plans_by_hand():
    natural = plan()
    assert [(s.name, s.pool, s.per_epoch) for s in natural.sources] == [("a", 363, 363), ("b", 87, 87), ("c", 5, 5)]
    assert natural.total is None and natural.epoch == 455

    table = plan(mixture={"a": 0.5, "c": 0.5})  # b left out; epoch = what a and c hold
    assert [(s.name, s.per_epoch) for s in table.sources] == [("a", 184), ("c", 184)]
    budgeted = plan(mixture={"a": 0.25, "b": 0.75}, token_budget=4 * 1000 + 3)
    assert budgeted.total == 1000 and [s.per_epoch for s in budgeted.sources] == [250, 750]

    # Unbudgeted repeats: every sequence r times.
    assert [(s.pool, s.per_epoch) for s in plan(repeat={"a": 2, "c": 3}).sources] == [(363, 726), (87, 87), (5, 15)]
    # Budgeted repeats: 400 samples over weights 726/87/15 -> 351/42/7; the unique pools
    # that, seen 2/1/3 times, fill those shares: 176/42/3.
    reuse = plan(repeat={"a": 2, "c": 3}, token_budget=4 * 400)
    assert [(s.pool, s.per_epoch) for s in reuse.sources] == [(176, 351), (42, 42), (3, 7)]


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"mixture": {"a": 0.5, "zz": 0.5}}, "data.mixture.zz", "unknown source"),
        ({"repeat": {"zz": 2}}, "data.repeat.zz", "unknown source"),
        ({"mixture": {"a": 0.5, "b": 0.4}}, "data.mixture", "sum to 0.9"),
        ({"mixture": {"a": -0.5, "b": 1.5}}, "data.mixture.a", ">= 0"),
        ({"mixture": "uniform"}, "data.mixture", "natural"),
        ({"mixture": {"a": 1.0}, "repeat": {"a": 2}}, "data.repeat", "either"),
        ({"repeat": {"a": 0, "b": 0, "c": 0}}, "data.repeat", "nothing left"),
        ({"repeat": {"a": 2}, "token_budget": 4 * 10_000}, "data.token_budget", "hold only 818"),
        ({"token_budget": 3}, "data.token_budget", "less than one sample"),
        ({"cache_limit": "lots"}, "data.cache_limit", "not a size"),
    ],
)
def test_bad_mixtures_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as err:
        plan(**data)
    assert err.value.field == field and words in str(err.value)


def test_parse_bytes():
    assert parse_bytes("200gb", "f") == 200 << 30
    assert parse_bytes("1.5 MB", "f") == 3 << 19
    assert parse_bytes("4096", "f") == 4096
    assert parse_bytes("64mb", "f") == 64 << 20 and parse_bytes(1048576, "f") == 1048576  # prep's shard sizes
    with pytest.raises(ConfigError) as err:
        parse_bytes("lots", "--shard-size")
    assert err.value.field == "--shard-size" and "'lots' is not a size" in str(err.value)


@pytest.mark.parametrize("data", [{}, {"mixture": {"a": 0.2, "b": 0.3, "c": 0.5}}, {"repeat": {"a": 3, "c": 2}},
                                  {"repeat": {"a": 2}, "token_budget": 4 * 300}])
def test_every_pass_visits_each_pooled_sample_once(data):
    p = plan(**data)
    epochs = max(-(-2 * s.pool // s.per_epoch) for s in p.sources)  # >= 2 passes of every source
    source, sample = order(p).take(0, epochs * p.epoch)
    for s, sp in enumerate(p.sources):
        draws = sample[source == s]
        assert len(draws) == epochs * sp.per_epoch
        pool = set(draws[: sp.pool].tolist())
        assert len(pool) == sp.pool
        for k in range(len(draws) // sp.pool):
            chunk = draws[k * sp.pool : (k + 1) * sp.pool]
            assert sorted(chunk.tolist()) == sorted(pool), (sp.name, k)


def test_order_is_random_access_deterministic_and_seeded():
    p = plan(repeat={"a": 2, "c": 3})
    o = order(p)
    source, sample = o.take(0, 2 * p.epoch + 50)
    # Any slice, read cold by a fresh order object, matches the long read (across epochs).
    for start in (0, 31, p.epoch - 7, 2 * p.epoch + 3):
        s2, m2 = order(p).take(start, 40)
        assert (s2 == source[start : start + 40]).all() and (m2 == sample[start : start + 40]).all()
    other = order(p, seed=18).take(0, 200)
    assert (other[1] != sample[:200]).any()
    # The next epoch is a new shuffle, not a replay.
    assert (sample[: p.epoch] != sample[p.epoch : 2 * p.epoch]).any()


def test_mixture_windows_meet_the_shares():
    """At every window boundary b, each source has drawn round-ish(b * share): within 1 + S/2."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(2, 8))
        counts = np.maximum(1, rng.dirichlet(np.ones(n) * 0.5) * rng.integers(100, 5000)).astype(int)
        p = MixturePlan(tuple(SourcePlan(f"s{i}", int(c), int(c), int(c)) for i, c in enumerate(counts)), None)
        o = SampleOrder(p, {f"s{i}": (int(c),) for i, c in enumerate(counts)}, 1, int(rng.choice([8, 64, 500])), 64)
        source, _ = o.take(0, p.epoch)
        drawn = np.cumsum(np.eye(n, dtype=np.int64)[source], axis=0)
        for w in range(1, o.n_windows + 1):
            b = o._boundary(w)
            assert np.abs(drawn[b - 1] - b * counts / p.epoch).max() <= 1 + n / 2
        assert (drawn[-1] == counts).all()


def test_blocks_keep_reads_within_few_shards():
    # Shards of 50 (and one of 13); blocks of 16 samples: a block spans at most 3 shards.
    p = plan()
    source, sample = order(p, block=16).take(0, p.epoch)
    a = sample[source == 0]
    shard = np.minimum(a // 50, 7)
    for k in range(0, 350, 16):
        assert len(set(shard[k : k + 16].tolist())) <= 3

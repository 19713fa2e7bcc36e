"""How many samples each source contributes: the ``[data]`` mixture turned into integers.

A :class:`MixturePlan` says, per source, how many unique sequences it draws
from (``pool``) and how many draws it makes per *mixture epoch*
(``per_epoch``); an epoch is ``sum(per_epoch)`` samples long and the run
stops after ``total`` samples when there is a token budget.  Everything is an
exact integer so every rank, and a resumed run, derives the same plan.

See :mod:`titan_moe.data.config` for what each setting means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from titan_moe.data.config import DataConfig
from titan_moe.data.manifest import StreamInfo
from titan_moe.common.errors import ConfigError



@dataclass(frozen=True)
class SourcePlan:
    name: str
    samples: int
    """Sequences the stream holds."""
    pool: int
    """Unique sequences drawn from (the whole stream unless repeat + budget shrinks it)."""
    per_epoch: int
    """Draws per mixture epoch; above ``pool`` the source is seen several times (pass by pass)."""


@dataclass(frozen=True)
class MixturePlan:
    sources: tuple[SourcePlan, ...]
    """Sources with at least one draw per epoch, in name order."""
    total: int | None
    """Samples in the whole run (the token budget), or None to cycle epochs forever."""

    @property
    def epoch(self) -> int:
        return sum(s.per_epoch for s in self.sources)

    def shares(self) -> dict[str, float]:
        """Each source's share of the samples (its target token share)."""
        return {s.name: s.per_epoch / self.epoch for s in self.sources}

    def describe(self) -> list[str]:
        lines = [
            f"mixture epoch {self.epoch} samples, run "
            + (f"{self.total} samples" if self.total is not None else "unbounded")
        ]
        for s in self.sources:
            lines.append(
                f"  {s.name:<16} share {s.per_epoch / self.epoch:8.4%}  pool {s.pool}/{s.samples}  "
                f"passes/epoch {s.per_epoch / s.pool:.3f}"
            )
        return lines


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder); exact sum."""
    weight_sum = math.fsum(weights)
    if total < 0 or weight_sum <= 0:
        raise ValueError(f"cannot apportion {total} over weights {weights}")
    quotas = [total * w / weight_sum for w in weights]
    counts = [math.floor(q) for q in quotas]
    # Ties go to the earlier source so the result is a pure function of the inputs.
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_mixture(config: DataConfig, streams: dict[str, StreamInfo], seq_len: int,
                 listed: tuple[str, ...] | None = None) -> MixturePlan:
    """The integer plan for ``config`` over the prep output's ``streams``.

    ``listed`` names every source of the manifest (default: ``streams``); a
    mixture table may name a listed source with proportion 0 whose stream was
    not read.
    """
    config.check()
    known = sorted(listed if listed is not None else streams)
    budget = None
    if config.token_budget:
        budget = config.token_budget // seq_len
        if budget == 0:
            raise ConfigError("data.token_budget", f"{config.token_budget} tokens is less than one sample of {seq_len}")

    def unknown(field_name: str, table: dict) -> None:
        for name in table:
            if name not in known:
                raise ConfigError(f"{field_name}.{name}", f"unknown source; {config.root} has {known}")

    if isinstance(config.mixture, dict):
        unknown("data.mixture", config.mixture)
        names = [n for n in sorted(streams) if float(config.mixture.get(n, 0.0)) > 0]
        epoch = budget if budget is not None else sum(streams[n].sequences for n in names)
        counts = apportion(epoch, [float(config.mixture[n]) for n in names])
        sources = [SourcePlan(n, streams[n].sequences, streams[n].sequences, c) for n, c in zip(names, counts)]
    elif config.repeat:
        unknown("data.repeat", config.repeat)
        repeat = {n: float(config.repeat.get(n, 1.0)) for n in sorted(streams)}
        names = [n for n in sorted(streams) if repeat[n] > 0]
        if not names:
            raise ConfigError("data.repeat", "repeats every source 0 times; nothing left to train on")
        weights = [repeat[n] * streams[n].sequences for n in names]
        if budget is None:
            counts = [max(1, round(w)) for w in weights]
            pools = [streams[n].sequences for n in names]
        else:
            available = math.floor(math.fsum(weights))
            if budget > available:
                raise ConfigError(
                    "data.token_budget",
                    f"{config.token_budget} tokens = {budget} samples, but the sources hold only "
                    f"{available} samples at these repeats ({', '.join(f'{n} x{repeat[n]:g}' for n in names)}); "
                    "lower the budget or raise the repeats",
                )
            counts = apportion(budget, weights)
            # The unique pool that, seen repeat times, fills the source's share of the budget.
            pools = [min(streams[n].sequences, max(1, math.ceil(c / repeat[n]))) for n, c in zip(names, counts)]
        sources = [SourcePlan(n, streams[n].sequences, p, c) for n, p, c in zip(names, pools, counts)]
    else:
        sources = [SourcePlan(n, s.sequences, s.sequences, s.sequences) for n, s in sorted(streams.items())]

    sources = [s for s in sources if s.per_epoch > 0]
    if not sources:
        raise ConfigError("data.mixture", "leaves no source with any samples")
    return MixturePlan(sources=tuple(sources), total=budget)

"""From ``[data]`` and the prep output to a planned sample order, before any cache is touched.

Shared by the training loader, the validator and the pre-launch check
(``plan_data``): everything here reads only
manifests and indexes (no shard, no shared memory, no process group).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from titan_moe.data.config import DataConfig
from titan_moe.data.foundry import FORMAT_NAME as FOUNDRY
from titan_moe.data.foundry import read_foundry_output
from titan_moe.data.manifest import PrepOutput, read_prep_output
from titan_moe.data.mixture import MixturePlan, plan_mixture
from titan_moe.data.order import SampleOrder
from titan_moe.common.errors import ConfigError



@dataclass(frozen=True)
class StreamSetup:
    """Everything derived from the config and the prep output, before any cache is touched."""

    prep: PrepOutput
    plan: MixturePlan
    order: SampleOrder
    fingerprint: dict[str, Any]
    cache_dir: str


def resolve_cache_root(config: DataConfig, dump_folder: str) -> str:
    """``data.local_cache``, or ``{dump_folder}/data_cache/{hostname}``.

    The default names the host because a dump folder is often shared storage
    seen by every node, while a cache (and its owner lock) belongs to one node.
    """
    if config.local_cache:
        return config.local_cache
    return os.path.join(dump_folder or ".", "data_cache", socket.gethostname())


def prepare(config: DataConfig, seq_len: int, dump_folder: str = "") -> StreamSetup:
    """Read and check the prep output and plan the order (cheap; no shard is read)."""
    config.check()
    # Only the streams the mixture draws from must exist (an explicit table may leave some out).
    wanted = None
    if isinstance(config.mixture, dict):
        wanted = sorted(n for n, p in config.mixture.items() if float(p) > 0)
    reader = read_foundry_output if config.format == FOUNDRY else read_prep_output
    prep = reader(config.root, field="data.root", seq_len=seq_len, sources=wanted,
                            sources_field="data.mixture")
    plan = plan_mixture(config, prep.streams, seq_len, prep.listed)
    order = SampleOrder(
        plan,
        {n: s.shard_samples for n, s in prep.streams.items()},
        seed=config.shuffle_seed,
        window=config.mixture_window,
        block=config.shuffle_block,
    )
    fingerprint = {
        "prep": prep.digest,
        "plan": [[s.name, s.pool, s.per_epoch] for s in plan.sources],
        "total": plan.total,
        "seed": config.shuffle_seed,
        "window": config.mixture_window,
        "block": config.shuffle_block,
        "seq_len": seq_len,
    }
    cache_dir = os.path.join(resolve_cache_root(config, dump_folder), prep.digest[:16], "train")
    return StreamSetup(prep, plan, order, fingerprint, cache_dir)


def check_validation_root(job_config: Any) -> PrepOutput:
    """The checked validation prep output (no cache touched); ConfigError naming the field."""
    config: DataConfig = job_config.data
    if not config.validation_root:
        raise ConfigError(
            "data.validation_root",
            "is empty but [validation].enable is true; point it at a `titan-moe prep` output "
            "of held-out data, or disable validation",
        )
    reader = read_foundry_output if config.format == FOUNDRY else read_prep_output
    return reader(config.validation_root, field="data.validation_root",
                            seq_len=job_config.training.seq_len)


@dataclass(frozen=True)
class DataPlan:
    """``[data]`` planned once per process: the training streams and, when validation is on,
    the checked validation prep output.  Preflight builds it (``plan_data``) and the loader and
    the validator reuse it, so a rank reads each manifest and index once."""

    train: StreamSetup
    validation: PrepOutput | None


DATA_PLAN_ATTRIBUTE = "data_plan"
"""The attribute of a parsed run config that carries its ``DataPlan`` (set by ``plan_data``)."""


def plan_data(job_config: Any) -> DataPlan:
    """Every ``[data]`` check that needs only the manifests and indexes; for preflight.

    Runs before ``init_process_group`` (no cache, no shared memory, no shard
    read) and raises the ConfigErrors the builders would, naming the field and
    the stream.  The plan is attached to ``job_config`` (``DATA_PLAN_ATTRIBUTE``)
    for the builders that run later in the same process.
    """
    train = prepare(job_config.data, job_config.training.seq_len, job_config.job.dump_folder)
    validation = check_validation_root(job_config) if getattr(job_config.validation, "enable", False) else None
    plan = DataPlan(train, validation)
    setattr(job_config, DATA_PLAN_ATTRIBUTE, plan)
    return plan


def planned_data(job_config: Any) -> DataPlan:
    """The plan preflight attached to this run config, or a fresh one (a builder called alone)."""
    plan = getattr(job_config, DATA_PLAN_ATTRIBUTE, None)
    return plan if plan is not None else plan_data(job_config)

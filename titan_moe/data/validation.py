"""Validation on a separate prep output, loss per source: ``build_streaming_validator``.

``[data].validation_root`` is a second ``titan-moe prep`` output (same
``seq_len``).  Each of its sources is read once per evaluation, in order, its
samples split over the data-parallel ranks by global batch; the last global
batch is padded with fully masked rows so every rank runs the same number of
forward passes (no collective hangs) and no sample is dropped or doubled,
whatever the DP degree.  ``[validation].steps`` caps the batches per source
(-1: the whole source).

The loss is exact token-weighted cross-entropy per source -- sum of the
per-token losses over sum of valid tokens, all-reduced over the DP ranks --
logged to TensorBoard as ``validation_metrics/loss/<source>`` next to
``validation_metrics/loss`` (all sources, token-weighted).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import BaseValidator

from titan_moe.data.config import DataConfig
from titan_moe.data.loader import make_batch
from titan_moe.data.setup import check_validation_root, planned_data, resolve_cache_root
from titan_moe.data.shard_store import ShardStore, open_store
from titan_moe.common.errors import ConfigError

logger = logging.getLogger(__name__)


class SourceValidationLoader(BaseDataLoader):
    """One validation source, once through, in order, as this DP rank's share of each global batch."""

    def __init__(self, store: ShardStore, source_index: int, samples: int, *, dp_rank: int,
                 dp_world_size: int, local_batch_size: int, pad_id: int, max_batches: int = -1):
        self.store = store
        self.source_index = source_index
        self.samples = samples
        self.dp_rank = dp_rank
        self.batch = local_batch_size
        self.global_batch = local_batch_size * dp_world_size
        self.pad_id = pad_id
        batches = -(-samples // self.global_batch)
        self.batches = batches if max_batches < 0 else min(batches, max_batches)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for k in range(self.batches):
            start = k * self.global_batch + self.dp_rank * self.batch
            ids = np.arange(start, min(start + self.batch, self.samples), dtype=np.int64)
            tokens = np.full((self.batch, self.store.seq_len), self.pad_id, dtype=np.int64)
            num_valid = np.zeros(self.batch, dtype=np.int64)  # padding rows: every label masked
            if len(ids):
                tokens[: len(ids)], num_valid[: len(ids)] = self.store.read(
                    np.full(len(ids), self.source_index), ids
                )
            if k + 1 < self.batches:
                # The next batch's shards, while this one is scored.
                nxt = np.arange(start + self.global_batch, min(start + self.global_batch + self.batch, self.samples))
                if len(nxt):
                    self.store.prefetch(np.full(len(nxt), self.source_index), nxt)
            yield make_batch(tokens, num_valid)

    # Validation always starts from the beginning: nothing to checkpoint.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def build_validation_loaders(dp_world_size: int, dp_rank: int, job_config: Any,
                             **_: Any) -> dict[str, SourceValidationLoader]:
    """Per-source validation loaders over ``[data].validation_root`` (all ranks must call it)."""
    config: DataConfig = job_config.data
    prep = planned_data(job_config).validation or check_validation_root(job_config)
    names = sorted(prep.streams)
    cache_dir = f"{resolve_cache_root(config, job_config.job.dump_folder)}/{prep.digest[:16]}/validation"
    store = open_store(prep, names, cache_dir, config)
    return {
        name: SourceValidationLoader(
            store,
            i,
            prep.streams[name].sequences,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            local_batch_size=job_config.validation.local_batch_size,
            pad_id=max(prep.pad_id, 0),
            max_batches=job_config.validation.steps,
        )
        for i, name in enumerate(names)
    }


@torch.no_grad()
def evaluate_sources(model: torch.nn.Module, loaders: dict[str, SourceValidationLoader],
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                     device: torch.device | str = "cpu", reduce: bool = True,
                     group: dist.ProcessGroup | None = None, context: Callable[[], AbstractContextManager] = nullcontext,
                     amp: AbstractContextManager | None = None,
                     on_batch: Callable[[int], None] | None = None) -> dict[str, tuple[float, int]]:
    """``{source: (summed loss, valid tokens)}`` over the DP ranks of ``group``.

    ``loss_fn`` must sum over tokens (torchtitan's ``cross_entropy_loss``
    does).  With ``reduce`` and torch.distributed up, the sums are all-reduced
    over ``group`` (default: the world); every rank of it must call this with
    loaders of the same lengths.
    """
    sums = torch.zeros(len(loaders), 2, dtype=torch.float64, device=device)
    for i, loader in enumerate(loaders.values()):
        for input_dict, labels in loader:
            if on_batch is not None:
                on_batch(labels.numel())
            inputs = input_dict["input"].to(device)
            labels = labels.to(device)
            with context():
                with amp if amp is not None else nullcontext():
                    predictions = model(inputs)
                    loss_sum = loss_fn(predictions, labels)
            sums[i, 0] += loss_sum.detach().to(torch.float64)
            sums[i, 1] += (labels != IGNORE_INDEX).sum()
    if reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, group=group)
    return {name: (float(sums[i, 0]), int(sums[i, 1])) for i, name in enumerate(loaders)}


def source_losses(results: dict[str, tuple[float, int]]) -> tuple[float, dict[str, float]]:
    """Token-weighted loss over all sources, and each source's own."""
    per_source = {name: loss / max(tokens, 1) for name, (loss, tokens) in results.items()}
    total_tokens = sum(tokens for _, tokens in results.values())
    overall = sum(loss for loss, _ in results.values()) / max(total_tokens, 1)
    return overall, per_source


class StreamingValidator(BaseValidator):
    """torchtitan validator scoring ``[data].validation_root`` source by source."""

    def __init__(self, job_config: Any, dp_world_size: int, dp_rank: int, tokenizer: Any,
                 parallel_dims: Any, loss_fn: Callable, validation_context: Callable,
                 maybe_enable_amp: AbstractContextManager, metrics_processor: Any = None,
                 pp_schedule: Any = None, pp_has_first_stage: bool | None = None,
                 pp_has_last_stage: bool | None = None):
        super().__init__(job_config)
        if parallel_dims.pp_enabled:
            raise ConfigError("parallelism.pipeline_parallel_degree",
                              "per-source validation does not run under pipeline parallelism; use pp = 1 or disable [validation]")
        if parallel_dims.cp_enabled:
            raise ConfigError("parallelism.context_parallel_degree",
                              "per-source validation does not run under context parallelism; use cp = 1 or disable [validation]")
        self.loaders = build_validation_loaders(dp_world_size, dp_rank, job_config)
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor

    def validate(self, model_parts: list[torch.nn.Module], step: int) -> None:
        from torchtitan.tools import utils

        (model,) = model_parts
        model.eval()
        # Only DP ranks see different samples; TP/EP peers of a DP rank hold the same sums.
        dp = self.parallel_dims.dp_enabled
        group = self.parallel_dims.get_mesh("batch").get_group() if dp else None

        def count(n: int) -> None:
            if self.metrics_processor is not None:
                self.metrics_processor.ntokens_since_last_log += n

        results = evaluate_sources(
            model, self.loaders, self.loss_fn, device=utils.device_type, reduce=dp, group=group,
            context=self.validation_context, amp=self.maybe_enable_amp, on_batch=count,
        )
        model.train()
        overall, per_source = source_losses(results)
        extra = {f"validation_metrics/loss/{name}": loss for name, loss in per_source.items()}
        if self.metrics_processor is not None:
            self.metrics_processor.log_validation(loss=overall, step=step, extra_metrics=extra)
        logger.info(
            f"validation step {step}: " + "  ".join(f"{n} {v:.4f}" for n, v in per_source.items())
        )

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.store.close()
            break  # one store serves every source


def build_streaming_validator(job_config: Any, dp_world_size: int, dp_rank: int, tokenizer: Any,
                              parallel_dims: Any, loss_fn: Callable, validation_context: Callable,
                              maybe_enable_amp: AbstractContextManager, metrics_processor: Any = None,
                              pp_schedule: Any = None, pp_has_first_stage: bool | None = None,
                              pp_has_last_stage: bool | None = None) -> StreamingValidator:
    """torchtitan ``TrainSpec.build_validator_fn`` (same signature as torchtitan's ``build_validator``)."""
    return StreamingValidator(
        job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn, validation_context,
        maybe_enable_amp, metrics_processor, pp_schedule, pp_has_first_stage, pp_has_last_stage,
    )

"""The torchtitan dataloader over the MDS mixture: ``build_streaming_dataloader``.

One loader per data-parallel rank.  Its state is the next *global* position
of the run's sample order (``order.py``) plus a fingerprint of everything
that defines that order, so the state is identical on every rank:

* exact resume: a run restored after step S reads from the position step S
  left, whatever epoch that falls in;
* another DP degree on resume keeps the same global order (rank ``r`` of ``D``
  reads its slice of each global batch); the loader logs the change;
* a changed mixture, seed, budget or prep output under a checkpoint is an
  error before training starts, never a silent restart of the data.

torchtitan saves the state through DCP; the keys are the same on all ranks,
so DCP stores one copy and every rank of a resized job finds it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import IGNORE_INDEX

from titan_moe.data.config import DataConfig
from titan_moe.data.setup import StreamSetup, planned_data
from titan_moe.data.shard_store import ShardStore, open_store
from titan_moe.common.errors import ConfigError

logger = logging.getLogger(__name__)

STATE_KEY = "titan_moe_stream"


def make_batch(tokens: np.ndarray, num_valid: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"input": tokens}, labels)``: labels are the next token, -100 where there is none.

    See ``titan_moe.data.config`` for the convention: label ``i`` is token
    ``i + 1``; the last position and every position ``i >= num_valid - 1`` (whose
    target is padding) are IGNORE_INDEX.
    """
    inputs = torch.from_numpy(tokens)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, :-1] = inputs[:, 1:]
    positions = torch.arange(inputs.shape[1])
    labels[positions[None, :] >= torch.from_numpy(num_valid)[:, None] - 1] = IGNORE_INDEX
    return {"input": inputs}, labels


class StreamingTokenLoader(BaseDataLoader):
    """Yields ``({"input": LongTensor[B, S]}, labels LongTensor[B, S])`` for one DP rank."""

    def __init__(self, setup: StreamSetup, store: ShardStore, *, dp_rank: int, dp_world_size: int,
                 local_batch_size: int, predownload: int = 0):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} outside dp_world_size {dp_world_size}")
        self.setup = setup
        self.order = setup.order
        self.store = store
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.batch = local_batch_size
        self.global_batch = local_batch_size * dp_world_size
        self.total = setup.plan.total
        self.predownload = predownload or 8 * local_batch_size
        self.position = 0
        """Global position of the next global batch (all ranks agree)."""
        self._prefetched = 0  # global position up to which shards were queued for download
        self.last_ids: np.ndarray | None = None
        """``[B, 2]`` (source index, sample id) of the last batch, for logs and tests."""

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.setup.plan.sources]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            base = self.position
            if self.total is not None and base + self.global_batch > self.total:
                # The budget is spent; a partial global batch would unbalance the ranks.
                logger.warning(f"data: token budget reached at sample {base} of {self.total}")
                return
            start = base + self.dp_rank * self.batch
            source, sample = self.order.take(start, self.batch)
            self._prefetch_ahead(base)
            tokens, num_valid = self.store.read(source, sample)
            self.last_ids = np.stack([source, sample], axis=1)
            # Counted before the yield: a checkpoint taken after this step must resume after it.
            self.position = base + self.global_batch
            yield make_batch(tokens, num_valid)

    def _prefetch_ahead(self, base: int) -> None:
        """Queue downloads for this rank's part of the next global batches (overlaps compute)."""
        horizon = base + (1 + max(1, self.predownload // self.batch)) * self.global_batch
        if self.total is not None:
            horizon = min(horizon, self.total)
        nxt = max(self._prefetched, base + self.global_batch)
        while nxt + self.global_batch <= horizon:
            self.store.prefetch(*self.order.take(nxt + self.dp_rank * self.batch, self.batch))
            nxt += self.global_batch
        self._prefetched = nxt

    # -- checkpointing ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            STATE_KEY: {
                "position": int(self.position),
                "fingerprint": json.dumps(self.setup.fingerprint, sort_keys=True),
                # Informational: resuming with another DP degree is allowed.
                "global_batch": int(self.global_batch),
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if STATE_KEY not in state_dict:
            raise ConfigError(
                "data",
                "the checkpoint's dataloader state was not written by the titan-moe streaming loader "
                f"(keys {sorted(state_dict)}); resume with the loader that wrote it, or add "
                "'dataloader' to checkpoint.exclude_from_loading to start the data from the beginning",
            )
        state = state_dict[STATE_KEY]
        saved = json.loads(state["fingerprint"])
        now = self.setup.fingerprint
        if saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            details = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ConfigError(
                "data",
                f"the data order changed since the checkpoint ({details}); the run would not see "
                "the samples it was meant to. Restore the [data] settings and prep output, or add "
                "'dataloader' to checkpoint.exclude_from_loading to start a new order on purpose",
            )
        if int(state["global_batch"]) != self.global_batch:
            logger.warning(
                f"data: resuming with global batch {self.global_batch} (checkpoint: "
                f"{state['global_batch']}); the sample order continues unchanged at position "
                f"{state['position']}"
            )
        self.position = int(state["position"])
        self._prefetched = 0

    def close(self) -> None:
        self.store.close()


def build_streaming_dataloader(dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: Any,
                               **_: Any) -> StreamingTokenLoader:
    """torchtitan ``TrainSpec.build_dataloader_fn``: the ``[data]`` mixture for one DP rank.

    Reads ``job_config.data`` (DataConfig), ``training.local_batch_size``,
    ``training.seq_len`` and ``job.dump_folder`` (default cache location).
    ``tokenizer`` is unused: the streams are already tokenized.
    """
    del tokenizer
    config: DataConfig = job_config.data
    setup = planned_data(job_config).train
    for line in setup.plan.describe():
        logger.info(f"data: {line}")
    store = open_store(setup.prep, [s.name for s in setup.plan.sources], setup.cache_dir, config)
    return StreamingTokenLoader(
        setup,
        store,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        local_batch_size=job_config.training.local_batch_size,
        predownload=config.predownload,
    )

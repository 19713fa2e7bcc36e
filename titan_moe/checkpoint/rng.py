"""Random-number generator state as a checkpoint entry, one per rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class RNGState(Stateful):
    """CPU (and CUDA) generator states of this rank, under a rank-specific key.

    Keys are per rank because DCP deduplicates identically named plain tensors
    across ranks; a rank whose key is absent on resume (the world grew) keeps
    its freshly seeded generators — the manager drops the entry before loading.
    """

    def key(self) -> str:
        return f"rank{_rank()}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{self.key()}.cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state[f"{self.key()}.cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if f"{self.key()}.cpu" in state_dict:
            torch.set_rng_state(state_dict[f"{self.key()}.cpu"])
        if f"{self.key()}.cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict[f"{self.key()}.cuda"])

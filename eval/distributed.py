"""The little torch.distributed the scorer needs: who am I, and gather results.

Eval shards *batches* (not examples) across ranks, so every example is
computed in exactly the batch it would be in with one process; results are
then gathered and reduced in example order on every rank.  That is what
makes N-process results identical to 1-process results.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def all_gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not is_distributed(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def init_from_env() -> tuple[bool, torch.device]:
    """Start a process group when launched by torchrun; pick this rank's device.

    Returns (we_started_it, device) so the caller tears down only what it
    started.  gloo on CPU, nccl when each rank has a GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        return True, device
    return False, device


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)

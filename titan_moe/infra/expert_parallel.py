"""Expert parallelism for ``GroupedExperts`` with a pure-torch token permutation.

``ExpertParallel`` is a ``ParallelStyle`` for the ``experts`` module of every
expert set.  The experts' weights ``[n, ...]`` are sharded on dim 0 over the
EP mesh (rank ``r`` owns experts ``r*n/ep ... (r+1)*n/ep - 1``).  Around the
module's ``forward(x_sorted, num_tokens_per_expert)``:

dispatch
    1. all-to-all the per-expert counts, so each rank learns how many tokens
       every peer sends to each of its local experts;
    2. all-to-all the tokens (autograd-aware): rank ``r`` receives, from every
       source rank in turn, that rank's tokens for ``r``'s experts;
    3. reorder the received rows from (source rank, local expert) order to
       (local expert, source rank) order, so each local expert's tokens are
       contiguous, as ``GroupedExperts`` expects.
combine
    undo 3, then the reverse all-to-all returns every token's output to the
    rank it came from, in the order it was sent.

torchtitan's own ``ExpertParallel`` does step 3 with a triton kernel (and pads
groups for grouped GEMM); this one uses ``argsort``/indexing, so it runs on
CPU/gloo as well as GPU, and leaves any padding to ``GroupedExperts``.  Within
one expert, rows keep (source rank, position) order, which is exactly the order
of the unsharded computation -- that is what makes EP=1 and EP>1 agree.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


def expert_major_order(counts: torch.Tensor) -> torch.Tensor:
    """Row order that regroups received tokens by local expert.

    ``counts[s, e]`` is how many rows source rank ``s`` sent for local expert
    ``e``; rows arrive grouped by ``s``, then by ``e``.  Returns indices ``perm``
    such that ``rows[perm]`` is grouped by ``e``, then by ``s`` (stable).
    """
    num_sources, num_local = counts.shape
    chunk = torch.arange(num_sources * num_local, device=counts.device)
    # Each received row's (source, expert) chunk id, in arrival order.
    chunk_of_row = torch.repeat_interleave(chunk, counts.reshape(-1))
    source, expert = chunk_of_row // num_local, chunk_of_row % num_local
    return torch.argsort(expert * num_sources + source, stable=True)


class ExpertParallel(ParallelStyle):
    """Shard a ``GroupedExperts`` over experts and route tokens with all-to-all."""

    def __init__(self) -> None:
        super().__init__()
        # Set by dispatch, used by combine of the same forward (also on AC recompute,
        # which re-runs dispatch before combine).
        self._send_splits: list[int] | None = None
        self._recv_splits: list[int] | None = None
        self._inverse: torch.Tensor | None = None

    @staticmethod
    def _partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(param_name, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

    def _dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh):
        x, counts = inputs
        group = mesh.get_group()
        ep = mesh.size()
        num_local = counts.numel() // ep
        with torch.no_grad():
            counts = counts.to(torch.int64)
            received = torch.empty_like(counts)
            # received[s*num_local + e]: rows peer s sends to my local expert e.
            dist.all_to_all_single(received, counts, group=group)
            received = received.view(ep, num_local)
            # One host sync for the split sizes, as any all-to-all of variable sizes needs.
            self._send_splits = counts.view(ep, num_local).sum(dim=1).tolist()
            self._recv_splits = received.sum(dim=1).tolist()
        x = all_to_all_single_autograd(x, self._recv_splits, self._send_splits, group)
        with torch.no_grad():
            perm = expert_major_order(received)
            self._inverse = torch.empty_like(perm)
            self._inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return x[perm], received.sum(dim=0)

    def _combine(self, module: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        out = out[self._inverse]  # back to (source rank, local expert) order
        return all_to_all_single_autograd(out, self._send_splits, self._recv_splits, mesh.get_group())

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            partition_fn=self._partition,
            input_fn=self._dispatch,
            output_fn=self._combine,
        )


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Shard the experts of every expert set over ``ep_mesh``; returns how many sets."""
    from titan_moe.model.moe import expert_sets

    sets = expert_sets(model)
    for name, expert_set in sets:
        if expert_set.num_experts % ep_mesh.size():
            raise ValueError(f"{name}: {expert_set.num_experts} experts do not split over EP degree {ep_mesh.size()}")
        # One style instance per module: it carries that module's split sizes from dispatch to combine.
        parallelize_module(expert_set.experts, ep_mesh, ExpertParallel())
    return len(sets)

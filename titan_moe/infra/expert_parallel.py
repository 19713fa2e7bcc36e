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

Host syncs: exactly one per expert set per forward (``_dispatch``: the send and
receive split sizes, read together with one ``.tolist()``), which an
all-to-all of uneven sizes needs; backward reuses the same host lists.  Full
activation checkpointing re-runs the forward, so one more there.  Rows past
the last expert's group (capacity-dropped slots) are not sent; their outputs
are zeros.  Dispatch and combine run outside ``torch.compile`` graphs
(``torch._dynamo.disable``): the split sizes are host integers that change
every step and would otherwise recompile the graph.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


def expert_major_order(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that regroups received tokens by local expert.

    ``counts[s, e]`` is how many rows source rank ``s`` sent for local expert
    ``e`` (``total`` rows in all, known on the host); rows arrive grouped by
    ``s``, then by ``e``.  Returns indices ``perm`` such that ``rows[perm]`` is
    grouped by ``e``, then by ``s`` (stable).
    """
    num_sources, num_local = counts.shape
    chunk = torch.arange(num_sources * num_local, device=counts.device)
    # Each received row's (source, expert) chunk id, in arrival order.
    chunk_of_row = torch.repeat_interleave(chunk, counts.reshape(-1), output_size=total)
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
        self._rows = 0

    @staticmethod
    def _partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(param_name, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

    @torch._dynamo.disable
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
            # The one host sync of the layer: split sizes, as any uneven all-to-all needs.
            splits = torch.cat([counts.view(ep, num_local).sum(dim=1), received.sum(dim=1)]).tolist()
            self._send_splits, self._recv_splits = splits[:ep], splits[ep:]
        self._rows = x.shape[0]
        sent = sum(self._send_splits)
        # Rows past the last group (capacity-dropped slots) stay home.
        x = all_to_all_single_autograd(x[:sent], self._recv_splits, self._send_splits, group)
        with torch.no_grad():
            perm = expert_major_order(received, sum(self._recv_splits))
            self._inverse = torch.empty_like(perm)
            self._inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return x[perm], received.sum(dim=0)

    @torch._dynamo.disable
    def _combine(self, module: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        out = out[self._inverse]  # back to (source rank, local expert) order
        out = all_to_all_single_autograd(out, self._send_splits, self._recv_splits, mesh.get_group())
        # Dropped slots' rows come back as zeros.
        return F.pad(out, (0, 0, 0, self._rows - out.shape[0]))

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
        # The megablocks capacity policy counts capacity over the EP group's tokens.
        expert_set.ep_group, expert_set.ep_rank, expert_set.ep_size = (
            ep_mesh.get_group(), ep_mesh.get_local_rank(), ep_mesh.size())
    return len(sets)

"""Feed-forward blocks: the dense SwiGLU and a bank of SwiGLU experts.

``GroupedExperts.forward(x, num_tokens_per_expert)`` takes tokens already
sorted by expert, the signature torchtitan's expert-parallel styles wrap, so
the same module runs unsharded or behind an all-to-all.  Two implementations
give the same numbers: one ``torch._grouped_mm`` call per matrix (Hopper), or
a loop over experts (everywhere).

Rows past the last expert's group (dropped capacity slots, or a dispatcher's
padding) produce zeros.  The grouped path has no host-device sync: group
offsets stay on the device and every size is known from the input's shape.
On CUDA it pads each group to 8 rows.  When the model or expert width does
not fill 16-byte rows (a multiple of 8 in bf16, 4 in float32: the grouped GEMM
needs 16-byte strides, on CPU too) it zero-pads the widths: padded hidden units compute silu(0) * 0 = 0 and receive zero
gradient, so outputs, gradients and the parameter/FLOP accounting (which
counts the real width) are unchanged; only the kernel does the extra work.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

# Hopper's grouped GEMM wants 16-byte-aligned row blocks and row strides: 8 bf16 values.
GROUPED_MM_ALIGN = 8

logger = logging.getLogger(__name__)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``.  The dense FFN and the generalist expert."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=0.02)
        nn.init.trunc_normal_(self.w3.weight, std=init_std)
        nn.init.trunc_normal_(self.w2.weight, std=init_std)


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked matrices.

    w1, w3: [n, hidden, dim]; w2: [n, dim, hidden] (nn.Linear's [out, in] per expert),
    sharded on dim 0 under expert parallelism.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool):
        super().__init__()
        self.num_experts = num_experts
        self.use_grouped_mm = use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        misaligned = [f"{name} {v}" for name, v in (("dim", dim), ("expert hidden", hidden_dim)) if v % GROUPED_MM_ALIGN]
        if use_grouped_mm and misaligned:
            logger.warning(f"grouped experts: {', '.join(misaligned)} not a multiple of {GROUPED_MM_ALIGN}; "
                           "zero-padded to 16-byte rows for the grouped GEMM (same results, some wasted FLOPs)")

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # Under expert parallelism the parameters are DTensors sharded over experts;
        # this rank computes with its local shard only.
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        if self.use_grouped_mm:
            return _experts_grouped_mm(w1, w2, w3, x, num_tokens_per_expert, GROUPED_MM_ALIGN if x.is_cuda else 1)
        return _experts_loop(w1, w2, w3, x, num_tokens_per_expert)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w3, std=init_std)
        nn.init.trunc_normal_(self.w2, std=init_std)


def _local(w: torch.Tensor) -> torch.Tensor:
    # isinstance, not hasattr: dynamo resolves the former on DTensor parameters.
    return w.to_local() if isinstance(w, DTensor) else w


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.mT) * (x @ w3.mT)) @ w2.mT


@torch._dynamo.disable
def _experts_loop(w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
    # .tolist() syncs with the device (the off-Hopper path); kept out of compiled
    # graphs, whose split sizes would otherwise recompile for every new load.
    counts = num_tokens_per_expert.tolist()
    used = sum(counts)
    chunks = torch.split(x[:used], counts, dim=0)
    # unbind, not w[e]: each indexing op's backward would zero-fill a full [n, ...] gradient.
    per_expert = zip(w1.unbind(0), w2.unbind(0), w3.unbind(0))
    outs = [_swiglu(chunk, a, b, c) for chunk, (a, b, c) in zip(chunks, per_expert)]
    out = torch.cat(outs, dim=0) if outs else x[:0]
    if used < x.shape[0]:  # rows past the last group (dropped slots, padding) produce zeros
        out = torch.cat([out, out.new_zeros(x.shape[0] - used, out.shape[-1])])
    return out


def _experts_grouped_mm(w1, w2, w3, x, num_tokens_per_expert, row_align: int = 1) -> torch.Tensor:
    """Three grouped GEMMs; groups padded to ``row_align`` rows, widths to 16-byte rows."""
    # The CUDA kernel takes bf16 only (with bf16 mixed precision these casts are no-ops);
    # on CPU, bf16 autocast applies here as to any matmul (compiled graphs need it).
    device = x.device.type
    autocast_bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
    dtype = torch.bfloat16 if x.is_cuda or autocast_bf16 else x.dtype
    # Every row stride must be a multiple of 16 bytes (CUDA and CPU kernels alike).
    width_align = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    dim, hidden = x.shape[-1], w1.shape[1]
    pad_dim, pad_hidden = -dim % width_align, -hidden % width_align
    if pad_dim or pad_hidden:
        # Zero rows/columns: padded hidden units are silu(0) * 0 = 0, padded model
        # columns are sliced off; gradients of the real entries are unchanged.
        x = F.pad(x, (0, pad_dim))
        w1, w3 = (F.pad(w, (0, pad_dim, 0, pad_hidden)) for w in (w1, w3))
        w2 = F.pad(w2, (0, pad_hidden, 0, pad_dim))
    x_padded, counts, rows = pad_groups(x, num_tokens_per_expert, row_align)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    # The kernel leaves rows past the last group unwritten, in outputs and in the input
    # gradient; masking its input makes their gradient zero rather than stale memory.
    x_padded = torch.where((torch.arange(x_padded.shape[0], device=x.device) < offsets[-1]).unsqueeze(-1), x_padded, 0.0)
    xp, w1, w2, w3 = (t.to(dtype) for t in (x_padded, w1, w2, w3))
    h = F.silu(torch._grouped_mm(xp, w1.mT, offs=offsets)) * torch._grouped_mm(xp, w3.mT, offs=offsets)
    out = torch._grouped_mm(h, w2.mT, offs=offsets).to(x.dtype)
    if rows is not None:
        out = out[rows]
    # ... and zero their outputs, as the loop does.
    in_group = torch.arange(x.shape[0], device=x.device) < num_tokens_per_expert.sum()
    out = torch.where(in_group.unsqueeze(-1), out, 0.0)
    return out[:, :dim] if pad_dim else out


def pad_groups(
    x: torch.Tensor, num_tokens_per_expert: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad every expert's row block to a multiple of ``align`` rows.

    Returns the padded rows, the padded group sizes, and the row index of each
    original row in the padded tensor (None when nothing was padded).  Rows of
    ``x`` past the last group (dropped slots) are placed after every padded
    group.  Done with tensor ops only, so there is no host-device sync.
    """
    counts = num_tokens_per_expert.to(torch.int64)
    if align == 1:
        return x, counts, None
    num_groups = len(counts)
    # The rows past the last group form one more (unaligned) group at the end.
    rest = x.shape[0] - counts.sum()
    padded = torch.cat([(counts + align - 1) // align * align, rest.view(1)])
    counts = torch.cat([counts, rest.view(1)])
    src_start = torch.cumsum(counts, 0) - counts
    dst_start = torch.cumsum(padded, 0) - padded
    # Each original row keeps its offset within its group, shifted to the group's padded start.
    group_of_row = torch.repeat_interleave(
        torch.arange(num_groups + 1, device=x.device), counts, output_size=x.shape[0]
    )
    rows = torch.arange(x.shape[0], device=x.device) - src_start[group_of_row] + dst_start[group_of_row]
    # Upper bound on padded rows, known on the host without a sync.
    capacity = x.shape[0] + num_groups * (align - 1)
    x_padded = x.new_zeros(capacity, x.shape[-1]).index_copy(0, rows, x)
    # Surplus rows beyond the last group are all-zero and belong to no group.
    return x_padded, padded[:num_groups], rows

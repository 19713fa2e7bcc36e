"""Feed-forward blocks: the dense SwiGLU and a bank of SwiGLU experts.

``GroupedExperts.forward(x, num_tokens_per_expert)`` takes tokens already
sorted by expert, the signature torchtitan's expert-parallel styles wrap, so
the same module runs unsharded or behind an all-to-all.  Two implementations
give the same numbers: one ``torch._grouped_mm`` call per matrix (Hopper), or
a loop over experts (everywhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Hopper's grouped GEMM wants each expert's row block 16-byte aligned: 8 rows of bf16.
GROUPED_MM_ALIGN = 8


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

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # Under expert parallelism the parameters are DTensors sharded over experts;
        # this rank computes with its local shard only.
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        if self.use_grouped_mm:
            return _experts_grouped_mm(w1, w2, w3, x, num_tokens_per_expert)
        return _experts_loop(w1, w2, w3, x, num_tokens_per_expert)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w3, std=init_std)
        nn.init.trunc_normal_(self.w2, std=init_std)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if hasattr(w, "to_local") else w


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.mT) * (x @ w3.mT)) @ w2.mT


def _experts_loop(w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
    # .tolist() syncs with the device; acceptable off-Hopper, where this path runs.
    counts = num_tokens_per_expert.tolist()
    used = sum(counts)
    chunks = torch.split(x[:used], counts, dim=0)
    # unbind, not w[e]: each indexing op's backward would zero-fill a full [n, ...] gradient.
    per_expert = zip(w1.unbind(0), w2.unbind(0), w3.unbind(0))
    outs = [_swiglu(chunk, a, b, c) for chunk, (a, b, c) in zip(chunks, per_expert)]
    out = torch.cat(outs, dim=0) if outs else x[:0]
    if used < x.shape[0]:  # rows past the last group (padding from a dispatcher) produce zeros
        out = torch.cat([out, out.new_zeros(x.shape[0] - used, out.shape[-1])])
    return out


def _experts_grouped_mm(w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
    align = GROUPED_MM_ALIGN if x.is_cuda else 1
    x_padded, counts, rows = pad_groups(x, num_tokens_per_expert, align)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    # The CUDA kernel takes bf16 only; with bf16 mixed precision these casts are no-ops.
    dtype = torch.bfloat16 if x.is_cuda else x.dtype
    xp, w1, w2, w3 = (t.to(dtype) for t in (x_padded, w1, w2, w3))
    h = F.silu(torch._grouped_mm(xp, w1.mT, offs=offsets)) * torch._grouped_mm(xp, w3.mT, offs=offsets)
    out = torch._grouped_mm(h, w2.mT, offs=offsets).to(x.dtype)
    if rows is not None:
        return out[rows]
    # Rows past the last group are left unwritten by the kernel: zero them as the loop does.
    in_group = torch.arange(x.shape[0], device=x.device) < offsets[-1]
    return torch.where(in_group.unsqueeze(-1), out, 0.0)


def pad_groups(
    x: torch.Tensor, num_tokens_per_expert: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad every expert's row block to a multiple of ``align`` rows.

    Returns the padded rows, the padded group sizes, and the row index of each
    original row in the padded tensor (None when nothing was padded).  Done
    with tensor ops only, so there is no host-device sync.
    """
    counts = num_tokens_per_expert.to(torch.int64)
    if align == 1:
        return x, counts, None
    padded = (counts + align - 1) // align * align
    src_start = torch.cumsum(counts, 0) - counts
    dst_start = torch.cumsum(padded, 0) - padded
    # Each original row keeps its offset within its group, shifted to the group's padded start.
    group_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0])
    rows = torch.arange(x.shape[0], device=x.device) - src_start[group_of_row] + dst_start[group_of_row]
    # Upper bound on padded rows, known on the host without a sync.
    capacity = x.shape[0] + len(counts) * (align - 1)
    x_padded = x.new_zeros(capacity, x.shape[-1]).index_copy(0, rows, x)
    # Surplus rows beyond the last group are all-zero and belong to no group.
    return x_padded, padded, rows

"""The MoE layer: routed expert sets, an optional generalist, balancing losses.

One ``ExpertSet`` is the paper's ``(n, g, k)``: a linear router, softmax over
its n experts, top-k selection, and n experts of hidden ``g * ffn_hidden``.
A ``MoE`` layer sums the outputs of its sets and of the always-active
generalist expert.

Choices that implementations disagree on, made explicit:
- aux loss (Switch form) per set: ``n * sum_i f_i * P_i`` with ``f_i`` the fraction
  of the set's token-slots (T*k) *selected* for expert i (before any capacity
  drop) and ``P_i`` the mean router probability of i.  Perfect balance gives 1.
- z-loss per set: ``mean_t(logsumexp(logits_t)^2)``.
- The model's aux loss is ``aux_loss_weight * aux + z_loss_weight * z`` summed
  over the sets of a layer and averaged over MoE layers, so depth does not
  change its scale.  It is a mean over the local tokens; the trainer weights it
  by the local share of tokens so the data-parallel degree does not change it.
- Loss-free balancing: ``expert_bias`` is added to the router probabilities for
  selection only; gate weights come from the unbiased probabilities.  After each
  optimizer step ``b_i += rate * sign(mean_load - load_i)`` on the globally
  reduced load, then ``b`` is re-centred to zero mean (top-k is shift-invariant,
  so this only keeps the numbers bounded).
- Capacity routing: each expert keeps at most ``ceil(capacity_factor * T * k / n)``
  slots of the local batch, the highest router probabilities first (ties: earlier
  token first); a dropped slot contributes zero to the token's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from titan_moe.model.args import MoEArgs
from titan_moe.model.experts import FeedForward, GroupedExperts


class Router(nn.Module):
    """Linear scores -> softmax -> (biased) top-k."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None):
        """Returns (logits [T,n], probs [T,n], top weights [T,k], top experts [T,k])."""
        # Routing decisions are made in float32 even under bf16 autocast.
        logits = self.gate(x).float()
        probs = F.softmax(logits, dim=-1)
        select = probs if expert_bias is None else probs + expert_bias
        top_experts = torch.topk(select, self.top_k, dim=-1).indices
        top_weights = probs.gather(-1, top_experts)
        if self.renormalize:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return logits, probs, top_weights, top_experts


class ExpertSet(nn.Module):
    """n experts of one granularity behind one router."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, moe: MoEArgs, use_grouped_mm: bool):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing = moe.routing
        self.capacity_factor = moe.capacity_factor
        self.use_bias = moe.bias_update_rate > 0
        self.router = Router(dim, num_experts, top_k, moe.renormalize)
        self.experts = GroupedExperts(dim, hidden_dim, num_experts, use_grouped_mm)
        # Part of the checkpoint: it steers routing and must survive a resume.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # Slots selected per expert since the last bias update (local, not reduced).
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, dim] -> [T, dim]."""
        num_tokens, k = x.shape[0], self.top_k
        logits, probs, weights, experts = self.router(x, self.expert_bias if self.use_bias else None)

        flat_expert = experts.reshape(-1)  # slot s = token * k + j
        selected = torch.bincount(flat_expert, minlength=self.num_experts)
        keep = self._capacity_mask(flat_expert, weights.reshape(-1), num_tokens)

        # Sort kept slots by expert (stable: within an expert, token order).
        slot_ids = torch.arange(num_tokens * k, device=x.device)
        if keep is not None:
            slot_ids = slot_ids[keep]
        slot_ids = slot_ids[torch.argsort(flat_expert[slot_ids], stable=True)]
        kept_per_expert = selected if keep is None else torch.bincount(flat_expert[slot_ids], minlength=self.num_experts)

        routed = self.experts(x[slot_ids // k], kept_per_expert)
        routed = routed * weights.reshape(-1)[slot_ids].unsqueeze(-1).to(routed.dtype)
        # Scatter back into (token, slot) places and sum the k slots: deterministic,
        # unlike an index_add over tokens on GPUs.
        out = routed.new_zeros(num_tokens * k, x.shape[-1]).index_copy(0, slot_ids, routed)
        out = out.view(num_tokens, k, -1).sum(dim=1)

        with torch.no_grad():
            self.tokens_per_expert.add_(selected.float())
        self.last_stats = {
            "aux_loss": self.num_experts * ((selected.float() / (num_tokens * k)) * probs.mean(dim=0)).sum(),
            "z_loss": torch.logsumexp(logits, dim=-1).square().mean(),
            "load": selected.detach(),
            "dropped_fraction": (1.0 - kept_per_expert.sum() / (num_tokens * k)).detach(),
        }
        return out.to(x.dtype)

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _capacity_mask(self, flat_expert: torch.Tensor, flat_weight: torch.Tensor, num_tokens: int):
        """Boolean mask of the slots an expert keeps, or None when nothing can drop."""
        if self.routing != "capacity":
            return None
        capacity = self.capacity(num_tokens)
        # Order slots by expert, then by descending router weight, then by position.
        by_weight = torch.argsort(flat_weight.detach(), descending=True, stable=True)
        order = by_weight[torch.argsort(flat_expert[by_weight], stable=True)]
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        group_start = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(len(order), device=order.device) - group_start[flat_expert[order]]
        keep = torch.zeros_like(flat_expert, dtype=torch.bool)
        keep[order] = rank_in_expert < capacity
        return keep

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor, rate: float) -> None:
        delta = rate * torch.sign(global_load.float().mean() - global_load.float())
        self.expert_bias.add_(delta - delta.mean())

    def init_weights(self, init_std: float, buffer_device: torch.device | None) -> None:
        nn.init.trunc_normal_(self.router.gate.weight, std=0.02)
        self.experts.init_weights(init_std)
        device = buffer_device or self.expert_bias.device
        self.expert_bias = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.float32, device=device)


class MoE(nn.Module):
    """Sum of expert sets plus an always-active generalist expert."""

    def __init__(self, dim: int, hidden_dims: list[int], generalist_hidden: int, moe: MoEArgs, use_grouped_mm: bool):
        super().__init__()
        self.sets = nn.ModuleList(
            ExpertSet(dim, h, s.num_experts, s.top_k, moe, use_grouped_mm) for s, h in zip(moe.expert_sets, hidden_dims)
        )
        self.generalist = FeedForward(dim, generalist_hidden) if generalist_hidden > 0 else None
        self.aux_loss_weight = moe.aux_loss_weight
        self.z_loss_weight = moe.z_loss_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        out = sum(expert_set(flat) for expert_set in self.sets)
        if self.generalist is not None:
            out = out + self.generalist(flat)
        return out.view(batch, seq, dim)

    def aux_loss(self) -> torch.Tensor:
        """Weighted balancing losses of the last forward, summed over sets."""
        return sum(
            self.aux_loss_weight * s.last_stats["aux_loss"] + self.z_loss_weight * s.last_stats["z_loss"]
            for s in self.sets
        )

    def init_weights(self, init_std: float, buffer_device: torch.device | None) -> None:
        for expert_set in self.sets:
            expert_set.init_weights(init_std, buffer_device)
        if self.generalist is not None:
            self.generalist.init_weights(init_std)


def expert_sets(model: nn.Module) -> list[tuple[str, ExpertSet]]:
    """Every expert set in the model with its name, in a fixed order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertSet)]


@torch.no_grad()
def update_expert_biases(
    model: nn.Module, rate: float, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Loss-free balancing step: reduce every set's load once, nudge biases, reset counters.

    ``all_reduce_sum`` sums a tensor over all ranks that saw different tokens
    (the whole data-parallel world, expert-parallel ranks included).
    """
    sets = [s for _, s in expert_sets(model)]
    if not sets:
        return
    loads = torch.cat([s.tokens_per_expert for s in sets])
    if all_reduce_sum is not None:
        loads = all_reduce_sum(loads)
    for expert_set, load in zip(sets, torch.split(loads, [s.num_experts for s in sets])):
        if rate > 0:
            expert_set.update_bias(load, rate)
        expert_set.tokens_per_expert.zero_()

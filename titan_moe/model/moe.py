"""The MoE layer: routed expert sets, an optional generalist, balancing losses.

One ``ExpertSet`` is the paper's ``(n, g, k)``: a linear router, softmax over
its n experts, top-k selection, and n experts of hidden ``g * ffn_hidden``.
A ``MoE`` layer sums the outputs of its sets and of the always-active
generalist expert.

Choices that implementations disagree on, made explicit:
- aux loss (Switch form) per set: ``n * sum_i f_i * P_i`` with ``f_i`` the fraction
  of the set's token-slots (T*k) *selected* for expert i (before any capacity
  drop) and ``P_i`` the mean router probability of i.  Perfect balance gives 1.
- z-loss per set, ``z_loss_normalization``: "tokens" (default)
  ``sum_t logsumexp(logits_t)^2 / T``; "tokens_topk" (megablocks/OLMoE)
  ``sum_t logsumexp(logits_t)^2 / (T * k)``.
- The model's aux loss is ``aux_loss_weight * aux + z_loss_weight * z`` summed
  over the sets of a layer and averaged over MoE layers, so depth does not
  change its scale.  It is a mean over the local tokens; the trainer weights it
  by the local share of tokens so the data-parallel degree does not change it.
- Loss-free balancing: ``expert_bias`` is added to the router probabilities for
  selection only; gate weights come from the unbiased probabilities.  After each
  optimizer step ``b_i += rate * sign(mean_load - load_i)`` on the globally
  reduced load, then ``b`` is re-centred to zero mean (top-k is shift-invariant,
  so this only keeps the numbers bounded).
- Capacity routing (``routing = "capacity"``), ``capacity_policy``:
  "priority": each expert keeps at most ``ceil(capacity_factor * T * k / n)``
  slots of the local batch, the highest router probabilities first (ties:
  earlier slot first); the expert-parallel degree does not change decisions.
  "megablocks": capacity ``int(capacity_factor * k * T * ep / n)`` per expert
  over the tokens of the whole expert-parallel group (T local tokens, ``ep``
  ranks), slots kept in position order (EP rank, then token, then choice j),
  later slots dropped first; a capacity of 0 drops nothing (megablocks then
  falls back to the largest load).  A dropped slot contributes zero.

The hot path has no host-device synchronisation on one device: expert counts
come from ``scatter_add`` into a fixed ``[n]`` tensor, capacity drops are a
fixed-size mask that moves dropped slots behind the last expert's rows, and
every tensor's size is known on the host from ``T``, ``k`` and ``n``.  (The
loop experts, the off-Hopper path, and expert parallelism's split sizes are
the documented exceptions; see experts.py and expert_parallel.py.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_tensor

from titan_moe.model.args import MoEArgs
from titan_moe.model.experts import FeedForward, GroupedExperts


def expert_counts(flat_expert: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Slots per expert as an int64 ``[num_groups]`` tensor.

    ``bincount`` sizes its output from the data (a host sync); ``scatter_add``
    into a fixed-size tensor does not, and is exact for integers.
    """
    counts = torch.zeros(num_groups, dtype=torch.int64, device=flat_expert.device)
    return counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))


def rank_in_group(order: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Position of every slot in its group, for slots taken in ``order`` (grouped, stable).

    Returns ``rank[s]`` for each slot ``s`` (not in ``order``'s order).
    """
    group_start = torch.cumsum(counts, 0) - counts
    sorted_groups = groups[order]
    rank_sorted = torch.arange(order.numel(), device=order.device) - group_start[sorted_groups]
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)


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
        self.capacity_policy = moe.capacity_policy
        self.z_loss_normalization = moe.z_loss_normalization
        self.use_bias = moe.bias_update_rate > 0
        self.router = Router(dim, num_experts, top_k, moe.renormalize)
        self.experts = GroupedExperts(dim, hidden_dim, num_experts, use_grouped_mm)
        # The expert-parallel group these experts are sharded over (set by
        # expert_parallel.apply_expert_parallel); the megablocks policy counts
        # capacity over its tokens.
        self.ep_group = None
        self.ep_rank, self.ep_size = 0, 1
        # Part of the checkpoint: it steers routing and must survive a resume.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # Slots selected per expert since the last bias update (local, not reduced).
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, dim] -> [T, dim].  Every tensor's size follows from T, k and n (no host sync)."""
        num_tokens, k, n = x.shape[0], self.top_k, self.num_experts
        logits, probs, weights, experts = self.router(x, self.expert_bias if self.use_bias else None)

        flat_expert = experts.reshape(-1)  # slot s = token * k + j
        flat_weight = weights.reshape(-1)
        selected = expert_counts(flat_expert, n)
        if self.routing == "capacity":
            keep = self.keep_mask(flat_expert, flat_weight, selected, num_tokens)
            # Dropped slots form a pseudo-group n behind every expert's rows: the
            # experts (and EP's dispatch) never compute them, and sizes stay fixed.
            group = torch.where(keep, flat_expert, n)
            kept_per_expert = expert_counts(group, n + 1)[:n]
            flat_weight = flat_weight * keep
        else:
            group, kept_per_expert = flat_expert, selected

        # Slots sorted by expert (stable: within an expert, slot order).
        order = torch.argsort(group, stable=True)
        routed = self.experts(x[order // k], kept_per_expert)
        routed = routed * flat_weight[order].unsqueeze(-1).to(routed.dtype)
        # Scatter back into (token, slot) places and sum the k slots: deterministic,
        # unlike an index_add over tokens on GPUs.
        out = routed.new_zeros(num_tokens * k, x.shape[-1]).index_copy(0, order, routed)
        out = out.view(num_tokens, k, -1).sum(dim=1)

        with torch.no_grad():
            self.tokens_per_expert.add_(selected.float())
        z_denominator = num_tokens * (k if self.z_loss_normalization == "tokens_topk" else 1)
        self.last_stats = {
            "aux_loss": n * ((selected.float() / (num_tokens * k)) * probs.mean(dim=0)).sum(),
            "z_loss": torch.logsumexp(logits, dim=-1).square().sum() / z_denominator,
            "load": selected.detach(),
            "dropped_fraction": (1.0 - kept_per_expert.sum() / (num_tokens * k)).detach(),
        }
        return out.to(x.dtype)

    def capacity(self, num_tokens: int) -> int:
        """Slots one expert keeps under ``routing = "capacity"`` (0: no limit, megablocks only)."""
        if self.capacity_policy == "megablocks":
            return int(self.capacity_factor * self.top_k * num_tokens * self.ep_size / self.num_experts)
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def keep_mask(self, flat_expert: torch.Tensor, flat_weight: torch.Tensor, selected: torch.Tensor,
                  num_tokens: int) -> torch.Tensor:
        """Boolean [T*k]: which slots their expert keeps.  Fixed-size ops only."""
        capacity = self.capacity(num_tokens)
        if self.capacity_policy == "megablocks":
            if capacity == 0:
                return torch.ones_like(flat_expert, dtype=torch.bool)
            # Position order within each expert; slots of lower EP ranks come first.
            order = torch.argsort(flat_expert, stable=True)
            rank = rank_in_group(order, flat_expert, selected)
            if self.ep_size > 1:
                # One fixed-size all-gather of the [n] counts (no host sync).
                every_rank = all_gather_tensor(selected, 0, self.ep_group).view(self.ep_size, -1)
                rank = rank + every_rank[: self.ep_rank].sum(dim=0)[flat_expert]
            return rank < capacity
        # Priority: by expert, then descending router weight, then position.
        by_weight = torch.argsort(flat_weight.detach(), descending=True, stable=True)
        order = by_weight[torch.argsort(flat_expert[by_weight], stable=True)]
        return rank_in_group(order, flat_expert, selected) < capacity

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

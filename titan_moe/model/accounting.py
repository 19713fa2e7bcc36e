"""Parameter and FLOP accounting, read off the built module.

Sweeps are planned from these numbers, so they come from the instantiated
model (on the meta device: no memory, no init), never from a parallel formula
that could drift from the code.

Conventions (comparable with torchtitan and the paper):
- total params: everything in the module (embedding and LM head over the padded
  vocabulary, attention, QK-norms, norms, routers, experts, generalist);
- active params: what one token touches — each expert set counts only k of
  its n experts; routers count fully;
- embedding params: the input embedding only (the LM head is a matmul and counts);
- ``flops_per_token = 6 * (active - embedding) + 12 * n_layers * n_heads * head_dim * seq_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from titan_moe.model.args import TitanMoEModelArgs, format_fraction
from titan_moe.model.moe import expert_sets
from titan_moe.model.transformer import Transformer


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int
    experts_total: int
    experts_active: int


def _numel(p: torch.Tensor) -> int:
    # DTensor.numel() is the global size, which is what we want under FSDP/EP.
    return p.numel()


def count_parameters(model: nn.Module) -> ParamCounts:
    total = sum(_numel(p) for p in model.parameters())
    embedding = _numel(model.tok_embeddings.weight)
    experts_total = experts_active = 0
    for _, s in expert_sets(model):
        per_expert = sum(_numel(p) for p in s.experts.parameters()) // s.num_experts
        experts_total += per_expert * s.num_experts
        experts_active += per_expert * s.top_k
    active = total - experts_total + experts_active
    return ParamCounts(total, active, embedding, experts_total, experts_active)


def flops_per_token(args: TitanMoEModelArgs, counts: ParamCounts, seq_len: int) -> int:
    attention = 12 * args.n_layers * args.n_heads * args.attn_head_dim * seq_len
    return 6 * (counts.active - counts.embedding) + attention


def build_on_meta(args: TitanMoEModelArgs) -> nn.Module:
    with torch.device("meta"):
        return Transformer(args)


def describe(args: TitanMoEModelArgs, seq_len: int | None = None) -> dict:
    """The numbers a sweep is planned from, as a JSON-ready dict."""
    seq_len = seq_len or args.max_seq_len
    counts = count_parameters(build_on_meta(args))
    moe = args.moe
    sets = []
    if moe.enabled:
        for s, hidden in zip(moe.expert_sets, args.expert_hidden_dims()):
            sets.append(
                {
                    "num_experts": s.num_experts,
                    "granularity": format_fraction(s.granularity),
                    "top_k": s.top_k,
                    "hidden_dim": hidden,
                    "sparsity": float(s.sparsity),
                }
            )
    dense_ffn = 3 * args.dim * args.ffn_hidden
    return {
        "kind": "moe" if moe.enabled else "dense",
        "total_params": counts.total,
        "active_params": counts.active,
        "embedding_params": counts.embedding,
        "non_embedding_active_params": counts.active - counts.embedding,
        "flops_per_token": flops_per_token(args, counts, seq_len),
        "seq_len": seq_len,
        "n_layers": args.n_layers,
        "dim": args.dim,
        "n_heads": args.n_heads,
        "head_dim": args.attn_head_dim,
        "ffn_hidden": args.ffn_hidden,
        "vocab_size": args.vocab_size,
        "padded_vocab_size": args.padded_vocab_size,
        "expert_sets": sets,
        "generalist_granularity": format_fraction(moe.generalist_granularity) if moe.enabled else "0",
        "generalist_hidden_dim": args.generalist_hidden_dim() if moe.enabled else 0,
        "flop_ratio": format_fraction(moe.flop_ratio),
        "flop_matched": moe.flop_ratio == Fraction(1),
        "dense_ffn_params_per_layer": dense_ffn,
        "expert_params_total": counts.experts_total,
        "expert_params_active": counts.experts_active,
        "routing": moe.routing if moe.enabled else None,
    }

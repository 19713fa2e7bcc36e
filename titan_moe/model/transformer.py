"""An OLMoE-like decoder whose FFN is dense or a Mixture of Experts.

Pre-norm RMSNorm, rotary position embeddings, QK-norm over the full q and k
widths, SwiGLU, no biases, untied input embedding and LM head.  Module names
follow torchtitan's (``tok_embeddings``, ``layers.N``, ``norm``, ``output``) so
its FSDP, activation-checkpointing and checkpoint tooling apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_moe.model.args import TitanMoEModelArgs
from titan_moe.model.experts import FeedForward
from titan_moe.model.moe import MoE, expert_sets


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x: [B, S, H, D] by position-dependent angles."""
    seq = x.shape[1]
    cos, sin = cos[:seq, None, :], sin[:seq, None, :]
    x = x.float().unflatten(-1, (-1, 2))
    real, imag = x[..., 0], x[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2)


class Attention(nn.Module):
    def __init__(self, args: TitanMoEModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.attn_head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        # OLMoE normalises q and k over their full projected widths, before the head split.
        self.q_norm = nn.RMSNorm(self.n_heads * self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = nn.RMSNorm(self.n_kv_heads * self.head_dim, eps=args.norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.view(batch, seq, self.n_heads, self.head_dim), cos, sin).type_as(v)
        k = apply_rotary(k.view(batch, seq, self.n_kv_heads, self.head_dim), cos, sin).type_as(v)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        # SDPA runs forward and backward on CPU too (FlexAttention has no CPU backward).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, std=init_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: TitanMoEModelArgs, use_grouped_mm: bool):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if args.moe.enabled:
            self.moe = MoE(args.dim, args.expert_hidden_dims(), args.generalist_hidden_dim(), args.moe, use_grouped_mm)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        # Output projections shrink with depth so the residual stream stays O(1).
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    @property
    def ffn(self) -> nn.Module:
        return self.moe if hasattr(self, "moe") else self.feed_forward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))

    def init_weights(self, buffer_device: torch.device | None) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        if hasattr(self, "moe"):
            self.moe.init_weights(self.init_std, buffer_device)
        else:
            self.feed_forward.init_weights(self.init_std)


def use_grouped_mm_for(impl: str) -> bool:
    """"auto" picks grouped GEMM on Hopper-class GPUs, the expert loop elsewhere."""
    if impl == "auto":
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    return impl == "grouped"


class Transformer(nn.Module):
    def __init__(self, args: TitanMoEModelArgs):
        super().__init__()
        self.args = args
        use_grouped_mm = use_grouped_mm_for(args.moe.expert_impl)
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args, use_grouped_mm) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.padded_vocab_size, bias=False)
        cos, sin = rotary_tables(args.attn_head_dim, args.max_seq_len, args.rope_theta)
        # Derived from args: rebuilt by init_weights, never checkpointed.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, padded_vocab_size]."""
        return self.output(self.final_hidden(tokens))

    def final_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> the normalised last hidden states [B, S, dim] that ``output`` maps to logits.

        Eval applies ``output`` only to the positions it scores, in cache-sized
        blocks, instead of materialising [B, S, vocab] logits (eval.models).
        """
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.norm(h)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialise in place; called after materialising a meta-device model."""
        device = buffer_device or self.rope_cos.device
        self.rope_cos, self.rope_sin = rotary_tables(self.args.attn_head_dim, self.args.max_seq_len, self.args.rope_theta, device)
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for layer in self.layers.values():
            layer.init_weights(buffer_device)
        self.norm.reset_parameters()
        final_std = self.args.dim**-0.5
        nn.init.trunc_normal_(self.output.weight, std=final_std, a=-3 * final_std, b=3 * final_std)

    # -- MoE side channel ------------------------------------------------------
    def moe_aux_loss(self) -> torch.Tensor | None:
        """Weighted balancing losses of the last forward, averaged over MoE layers."""
        losses = [layer.moe.aux_loss() for layer in self.layers.values() if hasattr(layer, "moe")]
        return torch.stack(losses).mean() if losses else None

    def moe_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Detached per-set statistics of the last forward, keyed ``layers.3.moe.sets.0``."""
        return {
            name: {key: value.detach() for key, value in s.last_stats.items()} | {"expert_bias": s.expert_bias.detach()}
            for name, s in expert_sets(self)
        }

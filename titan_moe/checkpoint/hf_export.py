"""Export a titan-moe checkpoint as a Hugging Face transformers model folder.

    titan-moe checkpoints export FOLDER --format hf --out HFDIR [--config RUN.toml] [--step N]

Only designs whose function a stock transformers architecture computes
exactly are exported (no custom code, `AutoModelForCausalLM` loads them):

| titan-moe design | transformers |
|---|---|
| MoE, one expert set, QK-norm, dropless, no generalist, no active selection bias | OLMoE |
| dense, QK-norm | OLMoE with one expert (softmax over one logit is exactly 1) |
| dense, no QK-norm | Llama |

Everything else is refused with the reason.  In particular a generalist
expert: Qwen2-MoE's shared expert is scaled by `sigmoid(w . x)` and has no
QK-norm (OLMo2 normalises after, not before, each sublayer), so no stock
architecture computes titan-moe's ungated generalist.

Two layout differences are converted: titan-moe rotates interleaved pairs
`(x[2i], x[2i+1])` of each head, transformers the halves `(x[i], x[i+d/2])`,
so the rows of wq/wk (and the QK-norm weights, which act on the full width)
are permuted per head; and the stacked expert matrices become one
`gate_proj`/`up_proj`/`down_proj` per expert.  transformers (the `hf`
extra) is imported only here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from titan_moe.common.errors import ConfigError
from titan_moe.model.args import TitanMoEModelArgs

# Token names tokenizer.json files use for end-of-text, in the order we trust them.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def target_architecture(args: TitanMoEModelArgs) -> str:
    """"olmoe" or "llama"; raises ConfigError naming why a design has no exact transformers equivalent."""
    problems = []
    if args.moe.enabled:
        moe = args.moe
        if len(moe.expert_sets) != 1:
            problems.append(f"{len(moe.expert_sets)} expert sets (heterogeneous experts): every transformers "
                            "MoE has one router per layer")  # fmt: skip
        if moe.generalist_granularity:
            problems.append("a generalist expert: Qwen2-MoE's shared expert is gated by sigmoid(w . x) and has no "
                            "QK-norm, titan-moe's generalist is ungated; no stock architecture matches")  # fmt: skip
        if moe.routing != "dropless":
            problems.append(f"routing = {moe.routing!r} drops tokens per batch; transformers' OLMoE is dropless")
        if not args.qk_norm:
            problems.append("MoE without QK-norm: OLMoE always normalises q and k")
    if (args.moe.enabled or args.qk_norm) and args.n_heads * args.attn_head_dim != args.dim:
        problems.append(f"n_heads x head_dim = {args.n_heads * args.attn_head_dim} != dim {args.dim}: "
                        "OLMoE derives head_dim as dim / n_heads")  # fmt: skip
    if problems:
        raise ConfigError("--format hf", "this design has no exact transformers architecture: " + "; ".join(problems))
    return "olmoe" if (args.moe.enabled or args.qk_norm) else "llama"


def _rotary_halves(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows of each head from interleaved (0,1),(2,3).. pairs to halves [0,2,4..,1,3,5..]."""
    shape = weight.shape
    w = weight.reshape(heads, head_dim // 2, 2, *shape[1:])
    return w.transpose(1, 2).reshape(shape).contiguous()


def convert_state(args: TitanMoEModelArgs, state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """titan-moe FQNs -> transformers names (OLMoE or Llama), with the rotary and expert layouts converted."""
    heads, kv_heads, hd = args.n_heads, args.kv_heads, args.attn_head_dim
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        attn = dst + "self_attn."
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
        out[attn + "q_proj.weight"] = _rotary_halves(state[src + "attention.wq.weight"], heads, hd)
        out[attn + "k_proj.weight"] = _rotary_halves(state[src + "attention.wk.weight"], kv_heads, hd)
        out[attn + "v_proj.weight"] = state[src + "attention.wv.weight"]
        out[attn + "o_proj.weight"] = state[src + "attention.wo.weight"]
        if args.qk_norm:
            out[attn + "q_norm.weight"] = _rotary_halves(state[src + "attention.q_norm.weight"], heads, hd)
            out[attn + "k_norm.weight"] = _rotary_halves(state[src + "attention.k_norm.weight"], kv_heads, hd)
        mlp = dst + "mlp."
        if args.moe.enabled:
            s = src + "moe.sets.0."
            bias = state.get(s + "expert_bias")
            if args.moe.bias_update_rate > 0 and bias is not None and bool(bias.ne(0).any()):
                raise ConfigError("--format hf", f"layer {i}: loss-free balancing biases steer top-k selection; "
                                  "OLMoE's router has none, so its routing would differ")  # fmt: skip
            out[mlp + "gate.weight"] = state[s + "router.gate.weight"]
            w1, w2, w3 = (state[s + f"experts.{w}"] for w in ("w1", "w2", "w3"))
            for e in range(w1.shape[0]):
                out[mlp + f"experts.{e}.gate_proj.weight"] = w1[e].contiguous()
                out[mlp + f"experts.{e}.up_proj.weight"] = w3[e].contiguous()
                out[mlp + f"experts.{e}.down_proj.weight"] = w2[e].contiguous()
        else:
            ff = src + "feed_forward."
            prefix = mlp + "experts.0." if arch == "olmoe" else mlp
            out[prefix + "gate_proj.weight"] = state[ff + "w1.weight"]
            out[prefix + "up_proj.weight"] = state[ff + "w3.weight"]
            out[prefix + "down_proj.weight"] = state[ff + "w2.weight"]
            if arch == "olmoe":  # one expert: softmax over a single logit is exactly 1 whatever the weight
                out[mlp + "gate.weight"] = state[ff + "w1.weight"].new_zeros(1, args.dim)
    return out


def hf_config(args: TitanMoEModelArgs, arch: str, eos_id: int, dtype: torch.dtype):
    import transformers

    common = dict(
        vocab_size=args.padded_vocab_size, hidden_size=args.dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, attention_bias=False, tie_word_embeddings=False,
        eos_token_id=eos_id, pad_token_id=None, bos_token_id=None, torch_dtype=dtype,  # pad: only the tokenizer's
    )  # fmt: skip
    if arch == "llama":
        config = transformers.LlamaConfig(intermediate_size=args.ffn_hidden, head_dim=args.attn_head_dim,
                                          mlp_bias=False, **common)  # fmt: skip
        config.architectures = ["LlamaForCausalLM"]
    elif args.moe.enabled:
        s = args.moe.expert_sets[0]
        config = transformers.OlmoeConfig(intermediate_size=args.expert_hidden_dims()[0], num_experts=s.num_experts,
                                          num_experts_per_tok=s.top_k, norm_topk_prob=args.moe.renormalize,
                                          clip_qkv=None, **common)  # fmt: skip
        config.architectures = ["OlmoeForCausalLM"]
    else:
        config = transformers.OlmoeConfig(intermediate_size=args.ffn_hidden, num_experts=1, num_experts_per_tok=1,
                                          norm_topk_prob=False, clip_qkv=None, **common)  # fmt: skip
        config.architectures = ["OlmoeForCausalLM"]
    return config


def resolve_eos(backend, eos_id: int | None, source: str) -> int:
    if eos_id is not None:
        return int(eos_id)
    for token in EOS_TOKENS:
        found = backend.token_to_id(token)
        if found is not None:
            return found
    raise ConfigError("--eos-id", f"{source} names no end-of-text token ({', '.join(EOS_TOKENS)}); pass --eos-id")


def write_hf_folder(
    args: TitanMoEModelArgs,
    state: dict[str, torch.Tensor],
    out: str | Path,
    *,
    tokenizer_text: str,
    tokenizer_source: str = "tokenizer.json",
    eos_id: int | None = None,
    metadata: dict | None = None,
    replace: bool = False,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors and tokenizer files into `out`, all or nothing.

    The folder works the way users call it: ``model.generate(**tok(text, return_tensors="pt"))``
    (the tokenizer returns only ``input_ids`` and ``attention_mask``, the model's inputs) and
    ``pipeline("text-generation")`` (eos and pad in generation_config.json, no warning).
    An existing non-empty `out` is refused unless ``replace``; then it is swapped whole.
    """
    try:
        import transformers
        from safetensors.torch import save_file
        from tokenizers import Tokenizer
    except ModuleNotFoundError as exc:
        raise ConfigError("--format hf", "exporting to transformers needs it: pip install 'titan-moe[hf]'") from exc
    arch = target_architecture(args)
    try:
        backend = Tokenizer.from_str(tokenizer_text)
    except Exception as exc:  # a truncated or foreign file: name it
        raise ConfigError("--tokenizer", f"{tokenizer_source} is not a valid tokenizer.json ({exc})") from exc
    eos = resolve_eos(backend, eos_id, tokenizer_source)
    tensors = convert_state(args, state, arch)
    dtype = state["tok_embeddings.weight"].dtype
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file; --format hf writes a folder: pass a new folder name")
    if out.exists() and any(out.iterdir()) and not replace:
        raise ConfigError("--out", f"{out} exists and is not empty; choose a new folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        config = hf_config(args, arch, eos, dtype)
        config.save_pretrained(tmp)
        # eos/pad for generate() and pipelines; pad = eos as in the tokenizer (OLMoE's
        # tokenizer has a pad token, but the model never saw it).
        transformers.GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=None).save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        eos_token = backend.id_to_token(eos)
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token=eos_token, pad_token=eos_token, model_max_length=args.max_seq_len,
            # Without it the tokenizer also returns token_type_ids, which generate() refuses.
            model_input_names=["input_ids", "attention_mask"],
        )
        tok.save_pretrained(tmp)
        (tmp / "titan_moe_export.json").write_text(json.dumps({"architecture": arch, **(metadata or {})}, indent=2))
        if out.exists():
            os.replace(out, old)  # empty, or replaced on request; removed once the new one is in place
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous export back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

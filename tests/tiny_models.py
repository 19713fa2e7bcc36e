"""Tiny randomly initialised Hugging Face models for the eval tests and the eval benchmark.

Small enough to score downstream tasks and Paloma documents on a laptop CPU in
seconds, with the real OLMoE tokenizer (so the vocabulary must cover its 50280 ids).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def save_tiny_hf_model(
    out_dir: str | Path,
    tokenizer_json: str | Path,
    *,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_seq_len: int = 128,
    vocab_size: int = 50304,
    eos_id: int = 50279,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Write a random `arch` ("llama" or "gpt_neox") causal LM plus tokenizer.json into out_dir."""
    import transformers

    out_dir = Path(out_dir)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_seq_len,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        pad_token_id=1,
        tie_word_embeddings=False,
        initializer_range=init_std,  # larger than usual so predictions are far from uniform
    )
    if arch == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=max(1, heads // 2), **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "gpt_neox":
        config = transformers.GPTNeoXConfig(**common)
        cls = transformers.GPTNeoXForCausalLM
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt_neox', got {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    model.save_pretrained(out_dir)
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    return out_dir

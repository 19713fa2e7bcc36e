"""Shared pieces of the eval tests: the real tokenizer, tiny models, an independent reference scorer.

The reference scorer deliberately avoids every part of `eval`: it tokenizes
with transformers' fast tokenizer and scores one unpadded sequence per forward pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TOKENIZER_JSON = SHARED / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
EOS = 50279


def require_shared_data() -> None:
    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"the shared OLMoE tokenizer copy is not next to the repo ({TOKENIZER_JSON})")


def make_tiny_model(tmp_dir: Path, arch: str = "llama", max_seq_len: int = 256) -> Path:
    pytest.importorskip("transformers", reason="the HF adapter tests need transformers (dev group)")
    from tests.tiny_models import save_tiny_hf_model

    require_shared_data()
    return save_tiny_hf_model(tmp_dir / f"tiny_{arch}", TOKENIZER_JSON, arch=arch, max_seq_len=max_seq_len)


class Reference:
    """Straightforward log-likelihoods with transformers: no batching, no padding."""

    def __init__(self, model_dir: Path, max_seq_len: int):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        self.tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
        self.max_seq_len = max_seq_len

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def token_logprobs(self, inputs: list[int], targets: list[int]) -> torch.Tensor:
        """log p(targets[i] | inputs[: i+1]) for the last len(targets) positions of one sequence."""
        logits = self.model(torch.tensor([inputs])).logits[0].double()
        logp = torch.log_softmax(logits[-len(targets) :], dim=-1)
        return logp[torch.arange(len(targets)), torch.tensor(targets)]

    def loglik(self, context: str, continuation: str) -> float:
        """Continuation LL given the context, keeping only the last max_seq_len+1 tokens."""
        ctx, cont = self.ids(context), self.ids(continuation)
        full = (ctx + cont)[-(self.max_seq_len + 1) :]
        return float(self.token_logprobs(full[:-1], cont).sum())

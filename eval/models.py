"""What the scorer needs from a model, and adapters that provide it.

The scorer is model-agnostic: anything callable on a LongTensor [B, S] that
returns logits [B, S, V] and says how long a context it takes, which token
ends a document, and what to call it in the report.  Two adapters ship:
a local Hugging Face causal LM (to score public reference models with the
same code) and a titan-moe checkpoint (`eval.checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from eval.tokenizer import TextTokenizer
from titan_moe.common.errors import ConfigError

# Buffers that accumulate statistics for the optimizer step, not model state.
_TRAINING_COUNTERS = ("tokens_per_expert",)


@runtime_checkable
class LogitsModel(Protocol):
    """tokens [B, S] (long) -> logits [B, S, V]; position i predicts token i+1."""

    max_seq_len: int
    eos_id: int
    name: str
    step: int | None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ModuleLogitsModel:
    """Wraps any nn.Module whose forward maps tokens to logits (titan-moe's Transformer).

    Also the adapter the trainer uses in-loop: it wraps the live (possibly
    FSDP-sharded) model, so no weights are copied.
    """

    module: nn.Module
    max_seq_len: int
    eos_id: int
    name: str = "model"
    step: int | None = None
    device: torch.device | str | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            # The first parameter's device; DTensor params report their local device.
            param = next(iter(self.module.parameters()), None)
            self.device = param.device if param is not None else torch.device("cpu")

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.module(tokens.to(self.device))
        return out.logits if hasattr(out, "logits") else out

    def final_hidden(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(last hidden states [B, S, D], output weight [V, D]) with ``logits == hidden @ weight.T``.

        None when this model's logits are not that product (see `_plain_output_head`);
        the scorer then takes the full logits from ``__call__``.
        """
        if self._output_head is None:
            return None
        trunk, weight = self._output_head
        return trunk(tokens.to(self.device)), weight

    @functools.cached_property
    def _output_head(self):
        # Decided once per wrapper, not per batch: walking every parameter for DTensors is not free.
        return _plain_output_head(self.module)

    @contextlib.contextmanager
    def scoring(self):
        """Eval mode for the duration, and training-side state left as it was.

        MoE layers count routed tokens per expert (`tokens_per_expert`) for the
        loss-free-balancing bias update; eval forwards must not leak into that
        count when the trainer scores in-loop.
        """
        was_training = self.module.training
        counters = {
            name: buf.detach().clone()
            for name, buf in self.module.named_buffers()
            if name.rsplit(".", 1)[-1] in _TRAINING_COUNTERS
        }
        self.module.eval()
        try:
            yield self
        finally:
            with torch.no_grad():
                for name, saved in counters.items():
                    self.module.get_buffer(name).copy_(saved)
            self.module.train(was_training)


# Hugging Face architectures whose causal-LM forward is exactly ``lm_head(decoder(x).last_hidden_state)``:
# no logit scale, soft-capping or bias (Gemma, Cohere and others add one and keep the full-logits path).
_PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "olmo", "olmo2", "olmoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
)


def _plain_output_head(module: nn.Module):
    """(trunk, output weight) when logits = trunk(tokens) @ weight.T, else None.

    Scoring needs logits only at the positions it scores, and applies the
    output layer there in cache-sized blocks: a [B, S, 50k] float32 logits
    tensor is gigabytes per batch, written once and read again by the
    log-softmax.  A sharded model (FSDP's DTensor parameters) is excluded: only
    its own ``forward`` gathers the shards of its embedding and output layer.
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        return None
    final_hidden, output = getattr(module, "final_hidden", None), getattr(module, "output", None)
    if callable(final_hidden) and isinstance(output, nn.Linear) and output.bias is None:
        return final_hidden, output.weight  # titan-moe's Transformer
    config = getattr(module, "config", None)
    if getattr(config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES and hasattr(module, "get_decoder"):
        head, decoder = module.get_output_embeddings(), module.get_decoder()
        if isinstance(head, nn.Linear) and head.bias is None and decoder is not None:
            return (lambda tokens: decoder(input_ids=tokens, use_cache=False).last_hidden_state), head.weight
    return None


def as_logits_model(
    model, *, max_seq_len: int | None = None, eos_id: int | None = None, name: str = "model", step: int | None = None
) -> LogitsModel:
    """Accept a ready LogitsModel, or wrap a bare nn.Module given its context length and EOS."""
    if isinstance(model, nn.Module):
        if max_seq_len is None:  # titan-moe's Transformer keeps its args on `.args`
            max_seq_len = getattr(getattr(model, "args", None), "max_seq_len", None)
        if max_seq_len is None or eos_id is None:
            raise ConfigError(
                "run_suite", "a bare nn.Module needs max_seq_len= and eos_id= (or wrap it in ModuleLogitsModel)"
            )
        return ModuleLogitsModel(model, max_seq_len=max_seq_len, eos_id=eos_id, name=name, step=step)
    if isinstance(model, LogitsModel):
        return model
    raise TypeError(f"expected an nn.Module or a LogitsModel, got {type(model).__name__}")


# -- Hugging Face causal LMs -------------------------------------------------


def _require_transformers():
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "--hf-model", "scoring a Hugging Face model needs `transformers`: pip install 'titan-moe[hf]'"
        ) from exc
    return transformers


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def load_hf_model(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    eos_id: int | None = None,
    tokenizer: str | None = None,
) -> tuple[ModuleLogitsModel, TextTokenizer]:
    """Load a local HF causal LM directory and its own tokenizer.

    Context length: `max_seq_len` if given, else the config's
    `max_position_embeddings` (OLMoE: 4096).  dtype: the checkpoint's own
    (`torch_dtype` in config.json) unless overridden.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError("--hf-model", f"{model_dir} has no config.json; point at a saved HF model directory")
    transformers = _require_transformers()
    # transformers >= 4.56 calls the argument `dtype`; older releases `torch_dtype`.
    dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), **{dtype_kw: dtype if dtype is not None else "auto"}
    )
    hf.to(device).eval()
    config = json.loads(config_path.read_text())
    if max_seq_len is None:
        max_seq_len = config.get("max_position_embeddings") or config.get("n_positions")
        if not max_seq_len:
            raise ConfigError("--max-seq-len", f"{config_path} states no max_position_embeddings; pass --max-seq-len")
    tok = TextTokenizer.load(tokenizer or str(model_dir), eos_id=eos_id)
    model = ModuleLogitsModel(
        hf, max_seq_len=int(max_seq_len), eos_id=tok.eos_id, name=model_dir.name, step=None, device=device
    )
    if tok.vocab_size > hf.get_output_embeddings().weight.shape[0]:
        raise ConfigError(
            "--tokenizer",
            f"tokenizer has {tok.vocab_size} ids but the model's output layer only "
            f"{hf.get_output_embeddings().weight.shape[0]}; use the model's own tokenizer",
        )
    return model, tok

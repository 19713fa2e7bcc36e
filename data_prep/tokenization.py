"""Loading the tokenizer and the facts prep needs from it.

``--tokenizer`` takes a ``tokenizer.json`` path, a directory holding one, or a
Hugging Face hub id (default: OLMoE's ``allenai/gpt-neox-olmo-dolma-v1_5``,
fetched with ``tokenizers.Tokenizer.from_pretrained``, so it needs the hub or
its local cache).  The tokenizer is resolved once, in the parent process, and
handed to workers as its JSON text: every worker tokenizes with exactly the
same object, and the hub is contacted at most once.

EOS and PAD come from the tokenizer's own vocabulary, never from constants:
for OLMoE, ``<|endoftext|>`` = 50279 and ``<|padding|>`` = 1.  Documents are
encoded without special tokens (OLMoE adds no BOS); prep appends EOS itself.

The module is named ``tokenization`` rather than ``tokenize`` so that it can
never shadow the standard library's ``tokenize`` module.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from titan_moe.common.errors import ConfigError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]")


@dataclass(frozen=True)
class TokenizerInfo:
    """A resolved tokenizer: its JSON and the ids prep writes."""

    name: str  # what the user passed (hub id or path), recorded in manifests
    json: str  # the full tokenizer.json, shipped to workers
    sha256: str  # of ``json``; identifies the tokenizer in done-markers and manifests
    vocab_size: int
    eos_id: int
    pad_id: int
    tokenizer: object = field(default=None, repr=False, compare=False)  # the loaded tokenizers.Tokenizer

    @property
    def dtype(self) -> str:
        """uint16 when every id fits (OLMoE: 50280 ids), else uint32."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


def _read_tokenizer_json(spec: str) -> str:
    if os.path.isdir(spec):
        path = os.path.join(spec, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError("--tokenizer", f"directory {spec} has no tokenizer.json")
        spec = path
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return f.read()
    looks_like_path = spec.endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_like_path:
        raise ConfigError("--tokenizer", f"{spec} does not exist; pass a tokenizer.json path or a hub id like org/name")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_pretrained(spec).to_str()
    except Exception as exc:  # offline, unknown id, gated repo ...
        raise ConfigError(
            "--tokenizer",
            f"could not load {spec!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "pass a local tokenizer.json path or a directory that holds one",
        ) from exc


def load_tokenizer(spec: str) -> TokenizerInfo:
    """Resolve ``--tokenizer`` and read EOS/PAD ids from its vocabulary."""
    from tokenizers import Tokenizer

    text = _read_tokenizer_json(spec)
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:
        raise ConfigError("--tokenizer", f"{spec} is not a valid tokenizer.json: {exc}") from exc
    eos = next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    if eos is None:
        raise ConfigError("--tokenizer", f"{spec} has none of the EOS tokens {', '.join(EOS_CANDIDATES)}")
    pad = next((tok.token_to_id(t) for t in PAD_CANDIDATES if tok.token_to_id(t) is not None), eos)
    return TokenizerInfo(
        name=spec,
        json=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=int(eos),
        pad_id=int(pad),
        tokenizer=tok,
    )

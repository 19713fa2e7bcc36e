"""Text -> token ids for scoring, over a Hugging Face `tokenizer.json`.

Scoring needs exactly one behaviour from a tokenizer: encode a string to ids
*without* any automatic special tokens (OLMoE's tokenizer adds none anyway;
Llama-style ones would add a BOS we do not want inside a continuation), and
decode ids back to text (to count UTF-8 bytes of pre-tokenized Paloma).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from titan_moe.common.errors import ConfigError

# Names under which tokenizer.json files declare their end-of-text token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


@dataclass
class TextTokenizer:
    """A thin wrapper around `tokenizers.Tokenizer` with the one encode we need."""

    backend: object  # tokenizers.Tokenizer
    eos_id: int
    source: str

    @classmethod
    def from_file(cls, path: str | Path, eos_id: int | None = None) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError("tokenizer", f"no tokenizer.json at {path}; pass --tokenizer PATH/tokenizer.json")
        backend = Tokenizer.from_file(str(path))
        return cls(backend, _resolve_eos(backend, eos_id, path.parent), str(path))

    @classmethod
    def from_text(cls, text: str, source: str, eos_id: int | None = None) -> TextTokenizer:
        """A tokenizer.json already read (from object storage, a checkpoint folder, ...)."""
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_str(text)
        except Exception as exc:  # a truncated or foreign file: name it
            raise ConfigError("tokenizer", f"{source} is not a valid tokenizer.json ({exc})") from exc
        return cls(backend, _resolve_eos(backend, eos_id, None), source)

    @classmethod
    def load(cls, name_or_path: str, eos_id: int | None = None) -> TextTokenizer:
        """A local tokenizer.json (or a directory holding one), an object-store URL, else a hub id."""
        if Path(name_or_path).exists():
            return cls.from_file(name_or_path, eos_id)
        from titan_moe.common import storage

        if storage.is_url(name_or_path):
            url = name_or_path if name_or_path.endswith(".json") else storage.join(name_or_path, "tokenizer.json")
            parent, _, name = url.rpartition("/")
            raw = storage.Store(parent).read_bytes(name)
            if raw is None:
                raise ConfigError("tokenizer", f"no tokenizer.json at {url}")
            return cls.from_text(raw.decode(), url, eos_id)
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_pretrained(name_or_path)
        except Exception as exc:  # network or unknown id: one readable message
            raise ConfigError(
                "tokenizer", f"{name_or_path!r} is neither a local path nor a reachable hub id ({exc})"
            ) from exc
        return cls(backend, _resolve_eos(backend, eos_id, None), name_or_path)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust tokenizer parallelises a batch; much faster than a loop.
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def _resolve_eos(backend, eos_id: int | None, model_dir: Path | None) -> int:
    """Explicit id > the model dir's config/tokenizer_config > a well-known token name."""
    if eos_id is not None:
        return int(eos_id)
    if model_dir is not None:
        for name in ("config.json", "generation_config.json"):
            cfg = model_dir / name
            if cfg.is_file():
                value = json.loads(cfg.read_text()).get("eos_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if isinstance(value, int):
                    return value
        tok_cfg = model_dir / "tokenizer_config.json"
        if tok_cfg.is_file():
            token = json.loads(tok_cfg.read_text()).get("eos_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and backend.token_to_id(token) is not None:
                return backend.token_to_id(token)
    for token in _EOS_CANDIDATES:
        found = backend.token_to_id(token)
        if found is not None:
            return found
    raise ConfigError("tokenizer", "cannot tell the end-of-text id; pass --eos-id")

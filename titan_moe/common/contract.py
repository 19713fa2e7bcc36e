"""The prep-to-training contract: format version, file names, manifest schema, columns.

``titan-moe prep`` (``data_prep``) writes these files and the loader
(``titan_moe.data.manifest``) reads them; both import this module and nothing
else of each other, so the contract is defined once.  It lives on the
training side (``titan_moe``) because data flows prep -> training: prep may
import training's small leaf modules (errors, storage, this), training never
imports ``data_prep``.

Accounting rule, checked in tests: for every file, source and run,
``docs_read == docs_written + docs_rejected``.  A "document read" is one
non-blank line of an input file, plus one for the unreadable tail of a
truncated or corrupt file (see ``truncated_file``).  Blank lines are not
documents and are not counted.

Rejection reasons (keys of ``rejected_by_reason``):

``invalid_utf8``
    the line is not valid UTF-8, or its ``text`` holds a lone surrogate
    (``"\\ud800"``), which no UTF-8 text can carry.
``invalid_json``
    the line does not parse as JSON, or parses to something other than an
    object.
``missing_text``
    the object has no ``text`` field, or it is ``null``.
``text_not_string``
    ``text`` is a number, list or object.
``empty_text``
    ``text`` is the empty string.
``truncated_file``
    the gzip/zstd stream ends before its end marker.  Every complete line
    before the cut is kept; the partial record after the last newline (even
    an empty one, when the cut fell on a line boundary) counts as exactly one
    rejected document, so a truncated file always shows up in the manifest.
``corrupt_file``
    the compressed data is damaged mid-stream.  As for truncation: lines
    decoded before the damage are kept, the unreadable rest of the file is
    counted as one rejected document (compressed streams cannot be
    resynchronised after damage).

Files
-----
``OUTPUT/<source>/manifest.json`` (:class:`SourceManifest`), written after the
stream's ``index.json``; its presence marks the stream complete.

``OUTPUT/manifest.json`` (the mixture manifest, :func:`mixture_manifest`)::

    {"format": "titan-moe-mds/1", "seq_len", "tokenizer", "tokenizer_sha256",
     "eos_id", "pad_id", "dtype",
     "sources": {name: {"tokens", "sequences", "shards", "proportion", "files",
                        "docs_read", "docs_written", "docs_rejected",
                        "rejected_by_reason"}}}

``OUTPUT/tokenizer.json`` (:data:`TOKENIZER`): the tokenizer the streams were
built with, byte for byte (its sha256 is the manifest's ``tokenizer_sha256``).
Written before the mixture manifest, so a root with a manifest has its
tokenizer too, local or on object storage: eval and export read it from there
(``titan_moe.data.run_tokenizer``) wherever the data lives.

``tokens`` counts real tokens (document tokens plus one EOS per document,
not the padding of the final sequence); ``proportion`` is the source's share
of all tokens in the mixture — the natural proportion OLMoE trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

FORMAT = "titan-moe-mds/1"
MANIFEST = "manifest.json"  # ROOT/manifest.json (mixture) and ROOT/<source>/manifest.json (stream)
INDEX = "index.json"  # ROOT/<source>/index.json, MosaicML's MDS index
TOKENIZER = "tokenizer.json"  # ROOT/tokenizer.json, the tokenizer of every stream in ROOT
TOKEN_DTYPES = ("uint16", "uint32")


def columns(dtype: str, seq_len: int) -> dict[str, str]:
    """The MDS columns of a titan-moe stream: ``tokens`` and its real length ``num_valid``."""
    return {"tokens": f"ndarray:{dtype}:{seq_len}", "num_valid": "int32"}

REJECT_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "missing_text",
    "text_not_string",
    "empty_text",
    "truncated_file",
    "corrupt_file",
)
# Line numbers kept per reason and file, so a person can find the bad records.
MAX_EXAMPLE_LINES = 10


@dataclass
class FileStats:
    """Counts for one input file (phase 1's result, also its done-marker body)."""

    path: str  # relative to the source directory
    size: int  # input bytes, to notice a changed input on resume
    docs_read: int = 0
    docs_written: int = 0
    tokens: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_lines: dict[str, list[int]] = field(default_factory=dict)
    error: str | None = None  # truncation/corruption detail

    @property
    def docs_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def reject(self, reason: str, line_no: int) -> None:
        assert reason in REJECT_REASONS, reason
        self.docs_read += 1
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
        lines = self.rejected_lines.setdefault(reason, [])
        if len(lines) < MAX_EXAMPLE_LINES:
            lines.append(line_no)

    def to_json(self) -> dict:
        out = asdict(self)
        out["docs_rejected"] = self.docs_rejected
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "FileStats":
        obj = dict(obj)
        obj.pop("docs_rejected", None)
        return cls(**obj)


@dataclass
class SourceManifest:
    """``OUTPUT/<source>/manifest.json``: one complete stream."""

    source: str
    seq_len: int
    tokenizer: str
    tokenizer_sha256: str
    eos_id: int
    pad_id: int
    dtype: str
    tokens: int
    sequences: int
    shards: int
    padded_tokens: int  # pad ids in the final sequence (0 when it is full)
    inputs: list[FileStats]
    group_bytes: int = 0  # prep's --group-size: how input files were grouped (see data_prep.groups)

    @property
    def files(self) -> int:
        return len(self.inputs)

    @property
    def docs_read(self) -> int:
        return sum(f.docs_read for f in self.inputs)

    @property
    def docs_written(self) -> int:
        return sum(f.docs_written for f in self.inputs)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for f in self.inputs:
            for reason, n in f.rejected_by_reason.items():
                total[reason] = total.get(reason, 0) + n
        return dict(sorted(total.items()))

    @property
    def docs_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def summary(self) -> dict:
        """The source's entry in the mixture manifest (without proportion)."""
        return {
            "tokens": self.tokens,
            "sequences": self.sequences,
            "shards": self.shards,
            "files": self.files,
            "docs_read": self.docs_read,
            "docs_written": self.docs_written,
            "docs_rejected": self.docs_rejected,
            "rejected_by_reason": self.rejected_by_reason,
        }

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "source": self.source,
            "seq_len": self.seq_len,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "dtype": self.dtype,
            **self.summary(),
            "padded_tokens": self.padded_tokens,
            "group_bytes": self.group_bytes,
            "inputs": [f.to_json() for f in self.inputs],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "SourceManifest":
        return cls(
            source=obj["source"],
            seq_len=obj["seq_len"],
            tokenizer=obj["tokenizer"],
            tokenizer_sha256=obj["tokenizer_sha256"],
            eos_id=obj["eos_id"],
            pad_id=obj["pad_id"],
            dtype=obj["dtype"],
            tokens=obj["tokens"],
            sequences=obj["sequences"],
            shards=obj["shards"],
            padded_tokens=obj["padded_tokens"],
            inputs=[FileStats.from_json(f) for f in obj["inputs"]],
            group_bytes=int(obj.get("group_bytes", 0)),
        )


def mixture_manifest(sources: dict[str, SourceManifest], *, seq_len: int, tokenizer: str,
                     tokenizer_sha256: str, eos_id: int, pad_id: int, dtype: str) -> dict:
    """The mixture manifest over complete sources, with natural proportions."""
    total = sum(m.tokens for m in sources.values())
    entries = {}
    for name in sorted(sources):
        entry = sources[name].summary()
        entry["proportion"] = sources[name].tokens / total if total else 0.0
        entries[name] = entry
    return {
        "format": FORMAT,
        "seq_len": seq_len,
        "tokenizer": tokenizer,
        "tokenizer_sha256": tokenizer_sha256,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "dtype": dtype,
        "sources": entries,
    }


def dumps(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()

"""Small prep outputs for the loader tests, written with the real ``MDSWriter`` per the Data contract.

Every sample says who it is: ``tokens[0] = 1000 + source index``,
``tokens[1:3]`` = its sample id (low, high 16 bits), the rest deterministic
filler that includes ids above 32767 (EOS 50279, 65535) so a wrong dtype
widening shows.  A source's final sequence is padded with ``pad_id`` after
``last_valid`` real tokens, as prep does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from streaming import MDSWriter

EOS = 50279
PAD = 1
SOURCE_BASE = 1000


def sample_tokens(source_index: int, sample_id: int, seq_len: int) -> np.ndarray:
    rng = np.random.default_rng([source_index, sample_id])
    tokens = rng.integers(2, 65536, size=seq_len, dtype=np.int64)
    tokens[0] = SOURCE_BASE + source_index
    tokens[1] = sample_id & 0xFFFF
    tokens[2] = sample_id >> 16
    tokens[seq_len // 2] = EOS
    tokens[-1] = 65535
    return tokens


def decode_ids(inputs) -> list[tuple[int, int]]:
    """(source index, sample id) of every row of an input batch."""
    rows = np.asarray(inputs)
    return [(int(r[0]) - SOURCE_BASE, int(r[1]) + (int(r[2]) << 16)) for r in rows]


def write_prep_output(root: str | os.PathLike, sources: dict[str, int], *, seq_len: int = 32,
                      shard_bytes: int = 1 << 12, last_valid: dict[str, int] | None = None,
                      dtype: str = "uint16", vocab: int | None = None) -> Path:
    """Write ``ROOT/<source>/`` MDS streams and ``ROOT/manifest.json``; returns ROOT.

    ``sources`` maps name -> sequences; names are indexed in sorted order.
    ``last_valid[name]`` cuts that source's final sequence to so many real tokens.
    ``vocab`` folds every id below it (for a small model; ``decode_ids`` then no longer applies).
    """
    root = Path(root)
    last_valid = last_valid or {}
    entries = {}
    total_tokens = 0
    for index, name in enumerate(sorted(sources)):
        count = sources[name]
        valid_last = last_valid.get(name, seq_len)
        with MDSWriter(
            out=str(root / name),
            columns={"tokens": f"ndarray:{dtype}:{seq_len}", "num_valid": "int32"},
            compression="zstd",
            hashes=["sha1", "xxh64"],
            size_limit=shard_bytes,
        ) as writer:
            for i in range(count):
                tokens = sample_tokens(index, i, seq_len)
                if vocab is not None:
                    tokens = 2 + tokens % (vocab - 2)
                valid = valid_last if i == count - 1 else seq_len
                tokens[valid:] = PAD
                writer.write({"tokens": tokens.astype(dtype), "num_valid": np.int32(valid)})
        tokens_real = (count - 1) * seq_len + valid_last
        total_tokens += tokens_real
        shards = len(json.loads((root / name / "index.json").read_text())["shards"])
        entries[name] = {
            "tokens": tokens_real, "sequences": count, "shards": shards, "files": 1,
            "docs_read": count, "docs_written": count, "docs_rejected": 0, "rejected_by_reason": {},
        }
    for entry in entries.values():
        entry["proportion"] = entry["tokens"] / total_tokens
    manifest = {
        "format": "titan-moe-mds/1", "seq_len": seq_len, "tokenizer": "test", "tokenizer_sha256": "0",
        "eos_id": EOS, "pad_id": PAD, "dtype": dtype, "sources": entries,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def write_foundry_output(folder: str | os.PathLike, count: int, *, seq_len: int, source_index: int = 0,
                         encoding: str = "ndarray:int32", vocab: int | None = None) -> Path:
    """One MDS folder as llm-foundry's ``convert_dataset_hf/json --concat_tokens seq_len`` writes it.

    A single column ``tokens`` -- ``ndarray:int32`` (current llm-foundry) or
    ``bytes`` holding int64 ids (older versions) -- zstd, no ``num_valid``,
    no manifest; samples as :func:`sample_tokens` (ids fit int32).
    """
    folder = Path(folder)
    with MDSWriter(out=str(folder), columns={"tokens": encoding}, compression="zstd", size_limit=1 << 11) as writer:
        for i in range(count):
            tokens = sample_tokens(source_index, i, seq_len)
            if vocab is not None:
                tokens = 2 + tokens % (vocab - 2)
            if encoding == "bytes":
                writer.write({"tokens": tokens.astype(np.int64).tobytes()})
            else:
                writer.write({"tokens": tokens.astype(np.int32)})
    return folder

"""Helpers for the ``titan-moe prep`` tests: a small OLMoE-layout corpus with
known good and bad records, an independent tokenization of what should be
kept, and readers for the written streams.

The corpus (``make_corpus``)::

    data/wiki/part-000.json.gz       good docs + one of every bad-record kind
    data/wiki/part-001.json.gz       truncated mid-record (gzip, after a sync flush)
    data/code/python/a-0000.json.zst good docs (multi-frame zstd)
    data/code/python/a-0001.json.zst truncated after a zstd block boundary
    data/code/rust.jsonl             plain JSON lines, no trailing newline
    data/math/m.json.gz              good docs only
    data/math/README.md              not an input file: ignored

Everything about what must be kept is decided here, independently of
``data_prep``: ``Corpus.kept[source]`` lists the texts prep must write, in
stream order (files sorted by path, lines in order).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / ".." / "shared" / "data" / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
EOS = 50279  # OLMoE's <|endoftext|>, from the model card, not from data_prep
PAD = 1  # OLMoE's <|padding|>

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were their one all we can her has there been if more when will would who so no model expert "
    "router token layer sparse dense mixture gradient learning rate batch sequence attention"
).split()
SNIPPETS = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { s += a[i]; }",
            "Ünïcödé café naïve — 漢字 テスト 😀", "$\\int_0^1 x^2 dx = 1/3$", "  indented\ttabs\n\n"]


def random_text(rng: random.Random, n_words: tuple[int, int] = (3, 60)) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(*n_words))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(SNIPPETS))
    return " ".join(words)


def jline(text, **extra) -> bytes:
    return (json.dumps({"id": extra.pop("id", "x"), "text": text, **extra}) + "\n").encode()


@dataclass
class Corpus:
    root: Path
    kept: dict[str, list[str]] = field(default_factory=dict)
    docs_read: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> reason -> count
    files: dict[str, int] = field(default_factory=dict)


def _gzip_truncated(lines: list[bytes], partial: bytes) -> bytes:
    """gzip of ``lines`` + ``partial``, sync-flushed and cut there: exactly
    ``lines`` decode, ``partial`` is the lost record, no end marker."""
    comp = zlib.compressobj(wbits=31)
    data = comp.compress(b"".join(lines) + partial) + comp.flush(zlib.Z_SYNC_FLUSH)
    return data  # no Z_FINISH: the stream ends before its trailer


def _zstd_frames(chunks: list[bytes]) -> bytes:
    """One zstd frame per chunk, concatenated (what ``zstd -T`` writes)."""
    return b"".join(zstandard.ZstdCompressor(level=3).compress(c) for c in chunks)


def _zstd_truncated(lines: list[bytes], partial: bytes) -> bytes:
    comp = zstandard.ZstdCompressor(level=3).compressobj()
    data = comp.compress(b"".join(lines) + partial) + comp.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    return data  # the frame is never finished


def make_corpus(root: Path, seed: int = 0, docs_per_file: int = 40) -> Corpus:
    rng = random.Random(seed)
    corpus = Corpus(root=root)
    data = root / "data"

    def add(source: str, kept: list[str], read: int, rejected: dict[str, int] | None = None, files: int = 1):
        corpus.kept.setdefault(source, []).extend(kept)
        corpus.docs_read[source] = corpus.docs_read.get(source, 0) + read
        bucket = corpus.rejected.setdefault(source, {})
        for reason, n in (rejected or {}).items():
            bucket[reason] = bucket.get(reason, 0) + n
        corpus.files[source] = corpus.files.get(source, 0) + files

    # wiki/part-000: good docs with one bad record of each kind mixed in.
    (data / "wiki").mkdir(parents=True)
    good = [random_text(rng) for _ in range(docs_per_file)]
    bad = [
        b'{"id": 1, "text": "unterminated\n',             # invalid_json
        b'["a", "list", "not", "an", "object"]\n',          # invalid_json
        b'{"id": 2, "meta": {"text": "nested"}}\n',        # missing_text
        b'{"id": 3, "text": null}\n',                       # missing_text
        b'{"id": 4, "text": ""}\n',                         # empty_text
        b'{"id": 5, "text": 42}\n',                         # text_not_string
        b'{"id": 6, "text": "caf\xe9 latin-1 bytes"}\n',    # invalid_utf8
        b'{"id": 7, "text": "lone \\ud800 surrogate"}\n',  # invalid_utf8 (cannot be UTF-8)
    ]
    lines = [jline(t) for t in good]
    for i, b in enumerate(bad):
        lines.insert(3 + 4 * i, b)
    lines.insert(10, b"\n")  # a blank line: not a document
    (data / "wiki" / "part-000.json.gz").write_bytes(gzip.compress(b"".join(lines)))
    add("wiki", good, len(good) + len(bad),
        {"invalid_json": 2, "missing_text": 2, "empty_text": 1, "text_not_string": 1, "invalid_utf8": 2})

    # wiki/part-001: truncated in the middle of a record.
    good = [random_text(rng) for _ in range(docs_per_file // 2)]
    partial = jline(random_text(rng))[:25]
    (data / "wiki" / "part-001.json.gz").write_bytes(_gzip_truncated([jline(t) for t in good], partial))
    add("wiki", good, len(good) + 1, {"truncated_file": 1})

    # code/python/a-0000: multi-frame zstd; a-0001: truncated at a block boundary.
    (data / "code" / "python").mkdir(parents=True)
    good = [random_text(rng, (20, 120)) for _ in range(docs_per_file)]
    enc = [jline(t) for t in good]
    (data / "code" / "python" / "a-0000.json.zst").write_bytes(_zstd_frames([b"".join(enc[:15]), b"".join(enc[15:])]))
    add("code", good, len(good))
    good = [random_text(rng, (20, 120)) for _ in range(docs_per_file // 2)]
    (data / "code" / "python" / "a-0001.json.zst").write_bytes(_zstd_truncated([jline(t) for t in good], b""))
    add("code", good, len(good) + 1, {"truncated_file": 1})
    # code/rust.jsonl: plain text, last line without newline.
    good = [random_text(rng) for _ in range(docs_per_file // 4)]
    (data / "code" / "rust.jsonl").write_bytes(b"".join(jline(t) for t in good).rstrip(b"\n"))
    add("code", good, len(good))

    # math: one clean file, plus a README that is not input.
    (data / "math").mkdir(parents=True)
    good = [random_text(rng) for _ in range(docs_per_file)]
    (data / "math" / "m.json.gz").write_bytes(gzip.compress(b"".join(jline(t) for t in good)))
    (data / "math" / "README.md").write_text("not a data file\n")
    add("math", good, len(good))
    return corpus


def load_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER))


def expected_tokens(tokenizer, texts: list[str]) -> np.ndarray:
    """Independent reference: each text encoded alone (not batched), EOS after each."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False).ids)
        ids.append(EOS)
    return np.array(ids, dtype=np.int64)


def read_stream(remote: str, cache: Path) -> list[dict]:
    """Every sample of a stream, in order, through MosaicML's reader.

    ``remote`` is the stream (a local directory or s3:// URL); the reader
    copies and decompresses shards into ``cache``, leaving ``remote`` as it is.
    """
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(remote=remote, local=str(cache), shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


def flatten(samples: list[dict]) -> np.ndarray:
    """The real tokens of a stream (padding of the final sequence removed)."""
    return np.concatenate([np.asarray(s["tokens"][: int(s["num_valid"])], dtype=np.int64) for s in samples])


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def verify_stream_files(stream_dir: Path) -> int:
    """Check that index.json's shards exist with their recorded sizes and hashes."""
    import xxhash

    index = json.loads((stream_dir / "index.json").read_text())
    for shard in index["shards"]:
        zip_info = shard["zip_data"]
        blob = (stream_dir / zip_info["basename"]).read_bytes()
        assert len(blob) == zip_info["bytes"]
        assert hashlib.sha1(blob).hexdigest() == zip_info["hashes"]["sha1"]
        assert xxhash.xxh64(blob).hexdigest() == zip_info["hashes"]["xxh64"]
        raw = zstandard.ZstdDecompressor().decompress(blob)
        assert hashlib.sha1(raw).hexdigest() == shard["raw_data"]["hashes"]["sha1"]
    return len(index["shards"])


def prep_command(input_root: str, output: str, *flags: str) -> list[str]:
    """``titan-moe prep INPUT_ROOT OUTPUT_URL FLAGS`` as a separate process (the CLI contract)."""
    import sys

    return [sys.executable, "-m", "titan_moe.cli", "prep", input_root, output, "--tokenizer", str(TOKENIZER),
            "--no-progress", *flags]


def big_corpus(root: Path, sources: dict[str, int], seed: int = 5, docs_per_file: int = 400) -> Path:
    """Plain-text corpus: ``sources`` maps name -> number of .jsonl files of ``docs_per_file`` docs."""
    rng = random.Random(seed)
    for source, n_files in sources.items():
        (root / "data" / source).mkdir(parents=True, exist_ok=True)
        for i in range(n_files):
            lines = b"".join(jline(random_text(rng, (20, 200))) for _ in range(docs_per_file))
            (root / "data" / source / f"part-{i:03}.jsonl").write_bytes(lines)
    return root

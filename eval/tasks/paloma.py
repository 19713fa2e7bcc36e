"""Paloma (Magnusson et al. 2023): perplexity over many text domains.

The paper's 11 subsets (OLMo's "v3-small ppl validation" set), read from
either public form:
- the Hugging Face text release: `<config>/<split>/*.jsonl.gz` with `text`,
  `id`, and `subdomain` for `dolma-v1_5` (it has no `ice` and no `pile`);
- OLMo's pre-tokenized copies: `v3_small_gptneox20b/<subset>/<split>/*.npy`
  (raw token memmaps) with `.csv.gz` sidecars of `start,end,id,...` rows.
  Their documents end in EOS id 0 (not 50279): documents are cut with the
  sidecar and that trailing 0 is dropped, so both forms score the same tokens.
  A file without sidecar is split after every EOS id 0 (the v3_small
  convention); the results say so in `document_split`.
  Byte counts for bits-per-byte come from decoding the tokens.

Token dtype of a raw memmap (uint16 for GPT-NeoX-20B ids, uint32 for dolma2's
100k vocabulary), first found wins: a real NumPy header; a JSON sidecar
(`<file stem>.json`, else `metadata.json` in the folder) with `"dtype"`; the
explicit option (`--paloma-dtype`); uint16.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from eval.tasks.records import LoadReport, read_jsonl
from eval.tokenizer import TextTokenizer
from titan_moe.common.errors import ConfigError

# subset -> (HF config, subdomain) ; None config: not in the HF text release.
SUBSETS: dict[str, tuple[str | None, str | None]] = {
    "c4_en": ("c4_en", None),
    "dolma_books": ("dolma-v1_5", "books"),
    "dolma_common-crawl": ("dolma-v1_5", "common-crawl"),
    "dolma_pes2o": ("dolma-v1_5", "pes2o"),
    "dolma_reddit": ("dolma-v1_5", "reddit_uniform"),
    "dolma_stack": ("dolma-v1_5", "stack_uniform"),
    "dolma_wiki": ("dolma-v1_5", "wiki"),
    "ice": (None, None),
    "m2d2_s2orc": ("m2d2_s2orc_unsplit", None),
    "pile": (None, None),
    "wikitext_103": ("wikitext_103", None),
}
TOKENIZED_DIR = "v3_small_gptneox20b"
TOKENIZED_EOS_ID = 0  # the EOS id inside OLMo's pre-tokenized Paloma files
TOKENIZE_CHUNK = 512  # documents per encode_batch call
TOKEN_DTYPES = ("uint16", "uint32")
SPLIT_BY_SIDECAR = "sidecar offsets (.csv.gz)"
SPLIT_BY_EOS = f"EOS id {TOKENIZED_EOS_ID} (OLMo v3_small convention; no .csv.gz sidecar)"


@dataclass
class Document:
    id: str
    tokens: list[int]
    n_bytes: int  # UTF-8 bytes of the text, for bits per byte


def select_subsets(subsets: list[str] | None) -> list[str]:
    if not subsets:
        return list(SUBSETS)
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ConfigError("--tasks paloma:<subset>", f"unknown subset(s) {', '.join(unknown)}; known: {', '.join(SUBSETS)}")
    return list(dict.fromkeys(subsets))


def paloma_root(data_root: Path | None, override: Path | None) -> Path:
    if override is not None:
        return Path(override)
    if data_root is None:
        raise ConfigError("--data-root", "Paloma is read from local files; pass --data-root (holding paloma/ ...)")
    root = Path(data_root)
    return root / "paloma" if (root / "paloma").is_dir() else root


def load_subset(
    subset: str,
    root: Path,
    tokenizer: TextTokenizer,
    *,
    split: str = "val",
    limit: int | None = None,
    progress: bool = False,
    tokenized_eos_id: int = TOKENIZED_EOS_ID,
    dtype: str | None = None,
) -> tuple[list[Document], LoadReport]:
    """Documents of one subset, pre-tokenized form first, else the text form.

    `report.document_split` says how pre-tokenized files were cut into documents.
    """
    tried = []
    for folder in (root / TOKENIZED_DIR / subset / split, root / subset / split):
        if folder.is_dir() and sorted(folder.glob("*.npy")):
            return _load_tokenized(folder, tokenizer, limit, tokenized_eos_id, dtype)
        tried.append(f"{folder}/*.npy")
    config, subdomain = SUBSETS[subset]
    if config is not None:
        folder = root / config / split
        files = sorted(folder.glob("*.jsonl.gz")) + sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if files:
            return _load_text(files, subdomain, tokenizer, limit, progress, subset)
        tried.append(f"{folder}/*.jsonl.gz")
    hint = (
        f"{subset} is not in the Hugging Face text release; use OLMo's pre-tokenized copy"
        if config is None
        else "download allenai/paloma or OLMo's pre-tokenized copy"
    )
    raise ConfigError(f"paloma:{subset}", f"no data found; tried {', '.join(tried)}. {hint}")


def _load_text(files, subdomain, tokenizer, limit, progress, subset) -> tuple[list[Document], LoadReport]:
    report = LoadReport(sources=[str(f) for f in files])
    keep: list[tuple[str, str]] = []  # (id, text)
    for path in files:
        for location, record, error in read_jsonl(path):
            if limit is not None and len(keep) >= limit:
                break
            report.read += 1
            if error is not None:
                report.skip(location, error)
                continue
            if subdomain is not None:
                if record.get("subdomain") is None:
                    report.skip(location, "subdomain: missing (needed to pick dolma-v1_5 subsets)")
                    continue
                if record["subdomain"] != subdomain:
                    continue
            text = record.get("text")
            if not isinstance(text, str):
                report.skip(location, "text: missing" if text is None else f"text: expected str, got {type(text).__name__}")
                continue
            if not text:
                report.skip(location, "text: empty document, nothing to score")
                continue
            keep.append((str(record.get("id", location)), text))
    docs: list[Document] = []
    bar = tqdm(total=len(keep), desc=f"tokenize {subset}", unit="doc", disable=not progress, leave=False)
    for s in range(0, len(keep), TOKENIZE_CHUNK):
        chunk = keep[s : s + TOKENIZE_CHUNK]
        for (doc_id, text), ids in zip(chunk, tokenizer.encode_batch([t for _, t in chunk])):
            docs.append(Document(doc_id, ids, len(text.encode("utf-8"))))
        bar.update(len(chunk))
    bar.close()
    return docs, report


def _declared_dtype(npy: Path) -> tuple[str, str] | None:
    """(dtype, where it was declared) from a JSON sidecar, or None."""
    import json

    for meta in (npy.with_name(npy.name[: -len(".npy")] + ".json"), npy.parent / "metadata.json"):
        if meta.is_file():
            try:
                value = json.loads(meta.read_text()).get("dtype")
            except (ValueError, AttributeError) as exc:
                raise ConfigError(str(meta), f"unreadable token-file metadata ({exc}); expected {{\"dtype\": \"uint32\"}}") from None
            if value is not None:
                if value not in TOKEN_DTYPES:
                    raise ConfigError(f"{meta}: dtype", f"{value!r} is not one of {', '.join(TOKEN_DTYPES)}")
                return value, str(meta)
    return None


def _read_token_file(path: Path, dtype: str | None, vocab_size: int) -> np.ndarray:
    """OLMo/dolma write raw memmaps named .npy (dtype: header, sidecar, option, uint16); real .npy files too."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        return np.load(path, mmap_mode="r")
    declared = _declared_dtype(path)
    chosen, origin = declared or ((dtype, "--paloma-dtype") if dtype else ("uint16", "default"))
    if chosen == "uint16" and vocab_size > 2**16:
        raise ConfigError(
            str(path),
            f"read as uint16 ({origin}) but the tokenizer has {vocab_size} ids; dolma2-style token files "
            "are uint32: pass --paloma-dtype uint32 or put {\"dtype\": \"uint32\"} in metadata.json next to it",
        )
    itemsize = np.dtype(chosen).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ConfigError(str(path), f"{size} bytes is not a whole number of {chosen} tokens ({origin}); wrong dtype?")
    return np.memmap(path, dtype=chosen, mode="r")


def _sidecar(npy: Path) -> Path | None:
    candidates = [npy.with_name(npy.name[: -len(".npy")] + ".csv.gz"), npy.with_suffix(".csv")]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _split_on_eos(tokens: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """[start, end) of each document, the separator excluded; a trailing run without one is a document too."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    spans, start = [], 0
    for end in ends.tolist():
        spans.append((start, end))
        start = end + 1
    if start < len(tokens):
        spans.append((start, len(tokens)))
    return spans


def _load_tokenized(folder: Path, tokenizer, limit, eos_id, dtype=None) -> tuple[list[Document], LoadReport]:
    report = LoadReport()
    docs: list[Document] = []
    splits = set()
    for npy in sorted(folder.glob("*.npy")):
        tokens = _read_token_file(npy, dtype, tokenizer.vocab_size)
        sidecar = _sidecar(npy)
        report.sources.append(str(npy))
        if sidecar is None:
            splits.add(SPLIT_BY_EOS)
            for k, (start, end) in enumerate(_split_on_eos(tokens, eos_id)):
                if limit is not None and len(docs) >= limit:
                    break
                report.read += 1
                location = f"{npy}#{k}"
                if start == end:
                    report.skip(location, "empty document, nothing to score")
                    continue
                ids = tokens[start:end].astype(np.int64).tolist()
                docs.append(Document(location, ids, len(tokenizer.decode(ids).encode("utf-8"))))
            continue
        splits.add(SPLIT_BY_SIDECAR)
        opener = gzip.open if sidecar.name.endswith(".gz") else open
        with opener(sidecar, "rt", newline="") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if limit is not None and len(docs) >= limit:
                    break
                location = f"{sidecar}:{lineno}"
                try:
                    start, end = int(row[0]), int(row[1])
                except (ValueError, IndexError):
                    if lineno == 1 and row and not row[0].strip().lstrip("-").isdigit():
                        continue  # a header line
                    report.read += 1
                    report.skip(location, f"expected 'start,end,...' integer offsets, got {row!r:.60}")
                    continue
                report.read += 1
                if not 0 <= start < end <= len(tokens):
                    report.skip(location, f"offsets [{start}, {end}) outside the {len(tokens)}-token file {npy.name}")
                    continue
                ids = tokens[start:end].astype(np.int64).tolist()
                if ids and ids[-1] == eos_id:
                    ids = ids[:-1]  # the file's document separator, not text
                if not ids:
                    report.skip(location, "empty document, nothing to score")
                    continue
                doc_id = row[2] if len(row) > 2 else location
                docs.append(Document(doc_id, ids, len(tokenizer.decode(ids).encode("utf-8"))))
    report.document_split = "; ".join(sorted(splits))
    return docs, report

"""Paloma (Magnusson et al. 2023): perplexity over many text domains.

The paper's 11 subsets (OLMo's "v3-small ppl validation" set), read from
either public form:
- the Hugging Face text release: `<config>/<split>/*.jsonl.gz` with `text`,
  `id`, and `subdomain` for `dolma-v1_5` (it has no `ice` and no `pile`);
- OLMo's pre-tokenized copies: `v3_small_gptneox20b/<subset>/<split>/*.npy`
  (uint16 token memmaps) with `.csv.gz` sidecars of `start,end,id,...` rows.
  Their documents end in EOS id 0 (not 50279): documents are cut with the
  sidecar and that trailing 0 is dropped, so both forms score the same tokens.
  Byte counts for bits-per-byte come from decoding the tokens.
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
from titan_moe.errors import ConfigError

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
) -> tuple[list[Document], LoadReport]:
    """Documents of one subset, pre-tokenized form first, else the text form."""
    tried = []
    for folder in (root / TOKENIZED_DIR / subset / split, root / subset / split):
        if folder.is_dir() and sorted(folder.glob("*.npy")):
            return _load_tokenized(folder, tokenizer, limit, tokenized_eos_id)
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


def _read_token_file(path: Path) -> np.ndarray:
    """OLMo/dolma write raw uint16 memmaps named .npy; accept real .npy files too."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        return np.load(path, mmap_mode="r")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _sidecar(npy: Path) -> Path:
    candidates = [npy.with_name(npy.name[: -len(".npy")] + ".csv.gz"), npy.with_suffix(".csv")]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(str(npy), f"no document-offset sidecar {candidates[0].name} next to it; cannot split documents")


def _load_tokenized(folder: Path, tokenizer, limit, eos_id) -> tuple[list[Document], LoadReport]:
    report = LoadReport()
    docs: list[Document] = []
    for npy in sorted(folder.glob("*.npy")):
        tokens = _read_token_file(npy)
        sidecar = _sidecar(npy)
        report.sources.append(str(npy))
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
    return docs, report

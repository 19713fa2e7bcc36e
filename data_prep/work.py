"""Phase 1: one input file -> one committed token file in the work directory.

For input ``data/<source>/<relpath>`` a worker writes, under the local token
directory (see ``data_prep.layout``; always on this machine's disk):

``<source>/<relpath>.tokens``
    the ids of every accepted document, each followed by EOS, in line order,
    as raw little-endian ``uint16``/``uint32`` (no header: phase 2 streams it).
``<source>/<relpath>.json``
    the done-marker: format, tokenizer sha256, EOS id, dtype and the file's
    :class:`~titan_moe.common.contract.FileStats`.  Written after the token file
    (atomically), so its presence means the token file is complete.

A file is skipped when its marker matches the current tokenizer, EOS, dtype
and input size and the token file has the recorded length; otherwise it is
tokenized again from scratch.  The token files of a file group are deleted
as soon as the group's MDS shards are written (``writer.write_group``).  Workers run with ``TOKENIZERS_PARALLELISM``
off, so ``--workers N`` uses N cores — the same footing the benchmark's
baseline gets.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from titan_moe.common.contract import FileStats
from data_prep.sources import InputFile, LineReader, parse_document
from titan_moe.common.storage import TMP_MARK, RetryPolicy, StorageError, Store, filesystem, is_url

WORK_FORMAT = "titan-moe-work/1"

# A batch is tokenized in one encode_batch call: large enough that the Rust
# call dominates Python overhead, small enough to bound memory per worker.
BATCH_DOCS = 512
BATCH_BYTES = 4 << 20

# (source, input_bytes, docs, tokens) increments, for the progress bars.
ProgressFn = Callable[[str, int, int, int], None]


@dataclass(frozen=True)
class WorkSettings:
    """What every worker needs; small and picklable."""

    input_url: str
    work_url: str  # the local token directory
    retry: RetryPolicy
    tokenizer_json: str
    tokenizer_sha256: str
    eos_id: int
    dtype: str


def token_key(f: InputFile) -> str:
    return f"{f.source}/{f.relpath}.tokens"


def marker_key(f: InputFile) -> str:
    return f"{f.source}/{f.relpath}.json"


class Worker:
    """Per-process state: the tokenizer, the input filesystem, the work store."""

    def __init__(self, settings: WorkSettings, progress: ProgressFn | None = None, tokenizer=None):
        from tokenizers import Tokenizer

        self.s = settings
        # In-process runs pass the parent's tokenizer; pool workers rebuild it from JSON.
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_str(settings.tokenizer_json)
        self.input_fs, _ = filesystem(settings.input_url, retries=settings.retry.attempts)
        self.input_protocol = "" if not is_url(settings.input_url) else settings.input_url.split("://", 1)[0]
        self.work = Store(settings.work_url, settings.retry)
        self.progress = progress or (lambda *args: None)
        self.np_dtype = np.dtype(settings.dtype).newbyteorder("<")

    # -- skip logic -------------------------------------------------------------
    def _marker(self, stats: FileStats) -> dict:
        return {
            "format": WORK_FORMAT,
            "tokenizer_sha256": self.s.tokenizer_sha256,
            "eos_id": self.s.eos_id,
            "dtype": self.s.dtype,
            "stats": stats.to_json(),
        }

    def finished(self, f: InputFile) -> FileStats | None:
        """The stats of an already committed file, or None if it must be redone."""
        raw = self.work.read_bytes(marker_key(f))
        if raw is None:
            return None
        try:
            marker = json.loads(raw)
            stats = FileStats.from_json(marker["stats"])
        except (ValueError, KeyError, TypeError):
            return None  # a marker from another version: redo the file
        same = (
            marker.get("format") == WORK_FORMAT
            and marker.get("tokenizer_sha256") == self.s.tokenizer_sha256
            and marker.get("eos_id") == self.s.eos_id
            and marker.get("dtype") == self.s.dtype
            and stats.size == f.size
        )
        if not same or self.work.size(token_key(f)) != stats.tokens * self.np_dtype.itemsize:
            return None
        return stats

    # -- the work ---------------------------------------------------------------
    def run(self, f: InputFile) -> tuple[FileStats, bool]:
        """Tokenize ``f`` unless already done; returns (stats, skipped)."""
        self.progress(f.source, 0, 0, 0)  # starts the source's clock for docs/s and tok/s
        done = self.finished(f)
        if done is not None:
            self.progress(f.source, f.size, 0, 0)
            return done, True
        # A stale marker must not vouch for the new token file while it is written.
        self.work.delete(marker_key(f))
        target = self.work.path(token_key(f))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # Named after this process: a run after a SIGKILL removes it (common.temp_files).
        tmp = f"{target}{TMP_MARK}{os.getpid()}"
        try:
            stats = self._tokenize(f, tmp)
            self.work.put_file(tmp, token_key(f), move=True)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.work.write_bytes(marker_key(f), json.dumps(self._marker(stats), indent=1).encode())
        return stats, False

    def _input_url(self, f: InputFile) -> str:
        return f"{self.input_protocol}://{f.path}" if self.input_protocol else f.path

    def _tokenize(self, f: InputFile, out_path: str) -> FileStats:
        stats = FileStats(path=f.relpath, size=f.size)
        reported = 0
        try:
            with self.input_fs.open(f.path, "rb") as raw, open(out_path, "wb") as out:
                reader = LineReader(raw, f.codec)
                batch: list[tuple[int, str]] = []
                batch_bytes = 0
                for line_no, line in reader:
                    if not line.strip():
                        continue  # blank lines are not documents
                    text, reason = parse_document(line)
                    if reason is not None:
                        stats.reject(reason, line_no)
                        continue
                    batch.append((line_no, text))
                    batch_bytes += len(line)
                    if len(batch) >= BATCH_DOCS or batch_bytes >= BATCH_BYTES:
                        n_tokens = self._flush(batch, stats, out)
                        self.progress(f.source, reader.raw_bytes - reported, len(batch), n_tokens)
                        reported = reader.raw_bytes
                        batch, batch_bytes = [], 0
                n_tokens = self._flush(batch, stats, out)
                if reader.failure is not None:
                    failure = reader.failure
                    stats.reject(failure.reason, failure.line_no)
                    stats.error = f"line {failure.line_no}: {failure.detail}"
        except OSError as exc:
            # Not bad data but a failing disk or store: stop, the re-run resumes.
            raise StorageError(f"could not read {self._input_url(f)}: {type(exc).__name__}: {exc}") from exc
        self.progress(f.source, f.size - reported, len(batch), n_tokens)
        return stats

    def _flush(self, batch: list[tuple[int, str]], stats: FileStats, out) -> int:
        """Tokenize a batch, append ids+EOS to ``out``; returns tokens written."""
        if not batch:
            return 0
        texts = [text for _, text in batch]
        try:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        except Exception:
            # Some text cannot cross into Rust (a lone surrogate from "\ud800"
            # in the JSON); find it by encoding one document at a time.
            encodings = []
            for line_no, text in batch:
                try:
                    encodings.append(self.tokenizer.encode(text, add_special_tokens=False))
                except Exception:
                    stats.reject("invalid_utf8", line_no)
        eos = [self.s.eos_id]
        pieces = []
        total = 0
        for enc in encodings:
            ids = enc.ids
            pieces.append(ids)
            pieces.append(eos)
            total += len(ids) + 1
        tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=self.np_dtype, count=total)
        out.write(tokens.tobytes())
        stats.docs_read += len(encodings)
        stats.docs_written += len(encodings)
        stats.tokens += total
        return total


# -- process-pool plumbing ------------------------------------------------------

_WORKER: Worker | None = None


def init_process(settings: WorkSettings, queue) -> None:
    """Pool initializer: one Worker per process, reporting progress to ``queue``."""
    global _WORKER
    # One core per worker: N workers use N cores, as --workers promises.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = Worker(settings, progress=lambda *update: queue.put(update))


def run_in_process(f: InputFile) -> tuple[FileStats, bool]:
    assert _WORKER is not None, "init_process was not called"
    return _WORKER.run(f)

"""Finding input files and reading them line by line, losing nothing silently.

Layout: ``INPUT_ROOT/data/<source>/**/<file>`` (the OLMoE-mix-0924 layout; an
``INPUT_ROOT`` without ``data/`` is taken as the data directory itself).  Each
source directory is searched recursively; the decompressor is chosen by
suffix: ``.gz`` gzip, ``.zst``/``.zstd`` zstandard, none for ``.json``/``.jsonl``.

Decompression is done here with streaming decoder objects rather than
``gzip.open``: that way a truncated stream (input ended before the end
marker) and a corrupt one (decoder error) are told apart, every byte decoded
before the problem is kept, and multi-member gzip / multi-frame zstd files
(what ``pigz``/``zstd -T`` write) are read whole.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import IO, Iterator

import fsspec
import zstandard

from data_prep.config import check_source_name
from titan_moe.common.errors import ConfigError

# suffix -> codec; longest suffixes first so ".json.gz" wins over ".json".
CODECS = {
    ".json.gz": "gzip",
    ".jsonl.gz": "gzip",
    ".json.zst": "zstd",
    ".jsonl.zst": "zstd",
    ".json.zstd": "zstd",
    ".jsonl.zstd": "zstd",
    ".json": None,
    ".jsonl": None,
}
READ_CHUNK = 1 << 20
# OLMoE-mix's zstd files can use long-distance matching windows; allow 2 GiB.
ZSTD_MAX_WINDOW = 1 << 31


@dataclass(frozen=True)
class InputFile:
    """One input file of a source."""

    source: str
    path: str  # inside the input filesystem
    relpath: str  # relative to the source directory, '/'-separated
    size: int
    codec: str | None


def codec_for(name: str) -> str | None | bool:
    """The codec for a file name, or False when it is not an input file."""
    for suffix, codec in CODECS.items():
        if name.endswith(suffix):
            return codec
    return False


def data_dir(fs: fsspec.AbstractFileSystem, root: str) -> str:
    candidate = root.rstrip("/") + "/data"
    return candidate if fs.isdir(candidate) else root.rstrip("/")


def discover(fs: fsspec.AbstractFileSystem, root: str,
             only: tuple[str, ...] | None = None) -> dict[str, list[InputFile]]:
    """Input files per source, each list sorted by relative path.

    Raises ConfigError when the root has no sources, a requested source is
    missing, or a requested source holds no input files.
    """
    base = data_dir(fs, root)
    if not fs.isdir(base):
        raise ConfigError("INPUT_ROOT", f"{root!r} is not a directory; pass the folder that holds data/<source>/")
    found = sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1]
        for entry in fs.ls(base, detail=True)
        if entry["type"] == "directory"
    )
    found = [name for name in found if not name.startswith((".", "_"))]
    if only is not None:
        missing = [name for name in only if name not in found]
        if missing:
            raise ConfigError(
                "--sources",
                f"unknown source(s) {', '.join(missing)}; {base} has: {', '.join(found) or 'none'}",
            )
        names = list(only)
    else:
        names = found
    if not names:
        raise ConfigError("INPUT_ROOT", f"no source directories under {base}; expected data/<source>/*.json.gz")

    out: dict[str, list[InputFile]] = {}
    for name in names:
        check_source_name(name, "INPUT_ROOT")
        src_dir = f"{base}/{name}"
        files = []
        for path, info in sorted(fs.find(src_dir, detail=True).items()):
            codec = codec_for(path)
            if codec is False:
                continue  # READMEs, checksums, ... are not documents
            rel = path[len(src_dir):].lstrip("/")
            files.append(InputFile(name, path, rel, int(info.get("size") or 0), codec))
        if not files:
            if only is not None:
                raise ConfigError("--sources", f"source {name!r} has no *.json[l][.gz|.zst] files under {src_dir}")
            continue  # an empty directory found by discovery is skipped, not an error
        out[name] = sorted(files, key=lambda f: f.relpath)
    if not out:
        raise ConfigError("INPUT_ROOT", f"no *.json[l][.gz|.zst] files under any source in {base}")
    return out


# -- reading -------------------------------------------------------------------


class _Truncated(Exception):
    pass


@dataclass
class ReadFailure:
    """Why a file stopped early, and the line number of the lost record."""

    reason: str  # "truncated_file" or "corrupt_file"
    detail: str
    line_no: int


def _new_decoder(codec: str):
    if codec == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header + trailer
    return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()


class LineReader:
    """Iterate ``(line_no, line_bytes)`` over a (compressed) JSON-lines file.

    After iteration, ``failure`` says whether the file ended early, and
    ``raw_bytes`` how many input bytes were consumed (for progress).  Errors
    of the underlying file object (network, permissions) propagate: they are
    not bad data, and the file will be read again on the next run.
    """

    def __init__(self, fileobj: IO[bytes], codec: str | None, chunk_size: int = READ_CHUNK):
        self._f = fileobj
        self._codec = codec
        self._chunk_size = chunk_size
        self.raw_bytes = 0
        self.failure: ReadFailure | None = None

    def _raw_chunks(self) -> Iterator[bytes]:
        while True:
            chunk = self._f.read(self._chunk_size)
            if not chunk:
                return
            self.raw_bytes += len(chunk)
            yield chunk

    def _chunks(self) -> Iterator[bytes]:
        if self._codec is None:
            yield from self._raw_chunks()
            return
        decoder = None  # the current gzip member / zstd frame; None between them
        for chunk in self._raw_chunks():
            while chunk:
                if decoder is None:
                    if self._codec == "gzip" and not chunk.strip(b"\0"):
                        break  # zero padding after the last member, as gzip(1) allows
                    decoder = _new_decoder(self._codec)
                out = decoder.decompress(chunk)
                if out:
                    yield out
                if decoder.eof:
                    chunk, decoder = decoder.unused_data, None
                else:
                    chunk = b""
        if decoder is not None:
            raise _Truncated(f"{self._codec} stream ended before its end marker (file truncated)")

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        line_no = 0
        pending: list[bytes] = []  # pieces of a line that spans chunks
        try:
            for chunk in self._chunks():
                start = 0
                while True:
                    end = chunk.find(b"\n", start)
                    if end < 0:
                        if start < len(chunk):
                            pending.append(chunk[start:])
                        break
                    piece = chunk[start:end]
                    if pending:
                        pending.append(piece)
                        piece = b"".join(pending)
                        pending = []
                    line_no += 1
                    yield line_no, piece
                    start = end + 1
        except _Truncated as exc:
            self.failure = ReadFailure("truncated_file", str(exc), line_no + 1)
            return
        except (zlib.error, zstandard.ZstdError) as exc:
            self.failure = ReadFailure("corrupt_file", f"{self._codec} data error: {exc}", line_no + 1)
            return
        if pending:  # last line without a trailing newline: a complete record
            line_no += 1
            yield line_no, b"".join(pending)


def parse_document(line: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable record, ``(None, reason)`` otherwise."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        obj = json.loads(decoded)
    except ValueError:
        return None, "invalid_json"
    if not isinstance(obj, dict):
        return None, "invalid_json"
    text = obj.get("text")
    if text is None:
        return None, "missing_text"
    if not isinstance(text, str):
        return None, "text_not_string"
    if not text:
        return None, "empty_text"
    return text, None

"""Reading input files: decompression by suffix, truncation/corruption, bad records, discovery."""

from __future__ import annotations

import gzip
import io
import json
import zlib

import fsspec
import pytest
import zstandard

from data_prep.sources import LineReader, codec_for, discover, parse_document
from titan_moe.common.errors import ConfigError

LINES = [json.dumps({"text": f"document number {i} " * (i % 7 + 1)}).encode() for i in range(400)]
BLOB = b"\n".join(LINES) + b"\n"


def read_all(data: bytes, codec: str | None, chunk_size: int = 1 << 20):
    reader = LineReader(io.BytesIO(data), codec, chunk_size=chunk_size)
    return list(reader), reader


@pytest.mark.parametrize("codec,data", [
    (None, BLOB),
    ("gzip", gzip.compress(BLOB)),
    ("gzip", gzip.compress(BLOB[:5000]) + gzip.compress(BLOB[5000:])),  # two members (pigz, cat a.gz b.gz)
    ("zstd", zstandard.ZstdCompressor().compress(BLOB)),
    ("zstd", b"".join(zstandard.ZstdCompressor().compress(p) for p in (BLOB[:7001], BLOB[7001:]))),  # frames
])
@pytest.mark.parametrize("chunk_size", [1 << 20, 97])  # whole-file reads, and lines spanning reads
def test_reads_every_line_in_order(codec, data, chunk_size):
    lines, reader = read_all(data, codec, chunk_size)
    assert [line for _, line in lines] == LINES
    assert [n for n, _ in lines] == list(range(1, len(LINES) + 1))
    assert reader.failure is None
    assert reader.raw_bytes == len(data)


def test_truncated_gzip_keeps_lines_before_the_cut():
    # A sync flush after line 250 and half of line 251 makes exactly that much decodable.
    cut = sum(len(line) + 1 for line in LINES[:250]) + 10
    comp = zlib.compressobj(wbits=31)
    data = comp.compress(BLOB[:cut]) + comp.flush(zlib.Z_SYNC_FLUSH)
    lines, reader = read_all(data, "gzip", chunk_size=1000)
    assert [line for _, line in lines] == LINES[:250]
    assert reader.failure.reason == "truncated_file"
    assert reader.failure.line_no == 251  # the record that was lost
    assert "truncated" in reader.failure.detail


def test_truncated_zstd_keeps_whole_blocks():
    comp = zstandard.ZstdCompressor().compressobj()
    cut = sum(len(line) + 1 for line in LINES[:100])
    data = comp.compress(BLOB[:cut]) + comp.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    data += comp.compress(BLOB[cut:])[:3]  # a few bytes of the next block, then nothing
    lines, reader = read_all(data, "zstd")
    assert [line for _, line in lines] == LINES[:100]
    assert (reader.failure.reason, reader.failure.line_no) == ("truncated_file", 101)


def test_truncated_file_cut_inside_a_real_gzip_stream():
    # The common real case: a download cut short at an arbitrary byte.
    data = gzip.compress(BLOB)[: len(gzip.compress(BLOB)) // 2]
    lines, reader = read_all(data, "gzip")
    assert reader.failure.reason == "truncated_file"
    assert 0 < len(lines) < len(LINES)
    assert [line for _, line in lines] == LINES[: len(lines)]


def test_corrupt_gzip_is_reported_with_the_lines_before_it():
    good = gzip.compress(BLOB[:3000])
    damaged = bytearray(gzip.compress(BLOB[3000:]))
    damaged[len(damaged) // 2:len(damaged) // 2 + 8] = b"\xff" * 8
    lines, reader = read_all(good + bytes(damaged), "gzip")
    assert reader.failure.reason == "corrupt_file"
    n_first = BLOB[:3000].count(b"\n")
    assert [line for _, line in lines][:n_first] == LINES[:n_first]


def test_parse_document_reasons():
    assert parse_document(b'{"text": "hi", "id": 1}') == ("hi", None)
    assert parse_document(b'{"text": "caf\xc3\xa9"}') == ("café", None)
    assert parse_document(b'{"text": "caf\xe9"}') == (None, "invalid_utf8")
    assert parse_document(b'{"text": "a"') == (None, "invalid_json")
    assert parse_document(b"[1, 2]") == (None, "invalid_json")
    assert parse_document(b'{"id": 1}') == (None, "missing_text")
    assert parse_document(b'{"text": null}') == (None, "missing_text")
    assert parse_document(b'{"text": ""}') == (None, "empty_text")
    assert parse_document(b'{"text": ["a"]}') == (None, "text_not_string")


def test_codec_by_suffix():
    assert codec_for("a/b/dclm-0001.json.zst") == "zstd"
    assert codec_for("python-0000.json.gz") == "gzip"
    assert codec_for("wiki.jsonl.gz") == "gzip"
    assert codec_for("x.jsonl") is None
    assert codec_for("README.md") is False


def test_discover_sorts_files_and_checks_sources(tmp_path):
    for rel in ["data/b/2.json.gz", "data/b/sub/1.json.gz", "data/b/10.json.gz", "data/a/x.json.zst",
                "data/a/notes.txt", "data/_hidden/z.json.gz"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    fs = fsspec.filesystem("file")
    found = discover(fs, str(tmp_path))
    assert list(found) == ["a", "b"]  # "_hidden" is reserved, not a source
    assert [f.relpath for f in found["b"]] == ["10.json.gz", "2.json.gz", "sub/1.json.gz"]
    assert [f.relpath for f in found["a"]] == ["x.json.zst"]  # notes.txt is not input
    assert list(discover(fs, str(tmp_path), ("b",))) == ["b"]
    with pytest.raises(ConfigError, match=r"--sources: unknown source\(s\) wiki; .* has: a, b"):
        discover(fs, str(tmp_path), ("b", "wiki"))
    with pytest.raises(ConfigError, match="INPUT_ROOT"):
        discover(fs, str(tmp_path / "missing"))

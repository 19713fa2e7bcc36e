"""Phase 2: a source's token files -> fixed-length sequences -> one MDS stream.

The token files are read in sorted input-path order, so the stream is the
same bytes whatever the worker count.  Sequences are cut every ``seq_len``
tokens straight across document and file boundaries (documents are already
EOS-terminated, no BOS).  The **final partial sequence** of a stream is kept,
not dropped: its real tokens are followed by ``pad_id`` up to ``seq_len`` and
its ``num_valid`` column says how many are real, so no accepted token is lost
and the loader masks the padding out of the loss.  Every other sequence has
``num_valid == seq_len``.

Columns: ``tokens`` = ``ndarray:<dtype>:<seq_len>``, ``num_valid`` = ``int32``;
zstd-compressed shards with sha1 and xxh64 hashes in ``index.json``, written
by :class:`data_prep.mds.MDSShardWriter` (MDSWriter's format, see there).

Publishing order (what keeps a stream readable at every instant):

1. delete ``<source>/manifest.json`` then ``<source>/index.json`` left by an
   interrupted earlier attempt, so no old index can refer to shards that are
   about to be replaced;
2. as the MDS writer closes each shard in a local staging directory, move or
   upload it to ``<source>/`` (bounded retries; failure names the object);
3. after the last shard, ``index.json``; the caller then writes the manifest.

Uploading shard by shard keeps local disk use to one shard for remote output.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np

from data_prep.config import parse_size
from data_prep.mds import MDSShardWriter
from data_prep.storage import StorageError, Store

READ_TOKENS = 1 << 21  # tokens per read of a work file (4 MiB of uint16)


@dataclass
class StreamResult:
    tokens: int  # real tokens written
    sequences: int
    shards: int
    padded_tokens: int  # pad ids in the final sequence


def _read_tokens(work: Store, key: str, dtype: np.dtype):
    """Yield arrays of ids from a work token file, in order."""
    itemsize = dtype.itemsize
    try:
        with work.open_read(key) as f:
            leftover = b""
            while True:
                data = f.read(READ_TOKENS * itemsize)
                if not data:
                    break
                data = leftover + data
                usable = len(data) - len(data) % itemsize
                leftover = data[usable:]
                if usable:
                    yield np.frombuffer(data[:usable], dtype=dtype)
    except OSError as exc:
        raise StorageError(f"could not read {work.url_of(key)}: {type(exc).__name__}: {exc}") from exc
    if leftover:
        raise StorageError(f"{work.url_of(key)} has a partial token ({len(leftover)} stray bytes); delete it and re-run")


def write_stream(*, source: str, token_files: list[tuple[str, int]], work: Store, out: Store,
                 staging: str, seq_len: int, dtype: str, pad_id: int, shard_size: int | str,
                 on_sequences: Callable[[int], None] | None = None) -> StreamResult:
    """Write ``out/<source>/`` (shards, then index.json) from work token files.

    ``token_files`` are ``(work key, expected token count)`` in stream order;
    ``staging`` is an empty local directory this function may fill and removes.
    """
    np_dtype = np.dtype(dtype).newbyteorder("<")
    out.delete(f"{source}/manifest.json")
    out.delete(f"{source}/index.json")

    def publish(basename: str) -> None:
        out.put_file(os.path.join(staging, basename), f"{source}/{basename}", move=True)

    writer = MDSShardWriter(
        staging,
        columns={"tokens": f"ndarray:{dtype}:{seq_len}", "num_valid": "int32"},
        size_limit=parse_size(shard_size),
        publish=publish,
    )
    full_valid = np.int32(seq_len).tobytes()
    sequences = 0
    tokens = 0
    carry = np.empty(0, dtype=np_dtype)
    try:
        for key, expected in token_files:
            got = 0
            for chunk in _read_tokens(work, key, np_dtype):
                got += chunk.size
                buf = np.concatenate([carry, chunk]) if carry.size else chunk
                full = buf.size // seq_len
                for i in range(full):
                    writer.write({"tokens": buf[i * seq_len:(i + 1) * seq_len].tobytes(), "num_valid": full_valid})
                sequences += full
                carry = buf[full * seq_len:].copy()
                if on_sequences and full:
                    on_sequences(full)
            if got != expected:
                raise StorageError(
                    f"{work.url_of(key)} holds {got} tokens but its marker says {expected}; "
                    "delete the file and its .json marker and re-run"
                )
            tokens += got
        padded = 0
        if carry.size:
            padded = seq_len - carry.size
            last = np.full(seq_len, pad_id, dtype=np_dtype)
            last[: carry.size] = carry
            writer.write({"tokens": last.tobytes(), "num_valid": np.int32(carry.size).tobytes()})
            sequences += 1
        writer.finish()  # flushes (publishes) the last shard, writes index.json
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out.put_file(os.path.join(staging, "index.json"), f"{source}/index.json", move=True)
    shutil.rmtree(staging, ignore_errors=True)
    return StreamResult(tokens=tokens, sequences=sequences, shards=len(writer.shards), padded_tokens=padded)

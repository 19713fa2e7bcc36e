"""Token files -> fixed-length sequences -> MDS shards, one file group at a time.

A source's stream is defined over its file groups (``groups.py``), which is
what lets many machines write one stream and still produce the same bytes:

1. **Group body** (:func:`write_group`, as soon as a group is tokenized, by
   whichever shard owns it): the group's token files, concatenated in sorted
   path order, are cut into ``seq_len`` sequences; the full ones become the
   group's shards ``shard.<group>.<k>.mds.zstd``, published straight into
   ``<source>/``.  The remaining ``< seq_len`` tokens are the group's *tail*.
2. **Tail** (:func:`write_tail`, at finalize): the tails of all groups, in
   group order, are cut the same way into ``shard.tail.<k>.mds.zstd``; the
   final partial sequence is padded with ``pad_id`` and its ``num_valid``
   column says how many tokens are real, so no accepted token is lost.

The stream's sample order is group 0's sequences, group 1's, ..., then the
tail sequences; ``index.json`` lists the shards in that order.  With a single
group (any source smaller than ``--group-size``) that is exactly the source's
tokens cut in order.  Sequences cross document and file boundaries (documents
are already EOS-terminated, no BOS).

Columns: ``titan_moe.common.contract.columns`` (``tokens`` =
``ndarray:<dtype>:<seq_len>``, ``num_valid`` = ``int32``), zstd shards with
sha1 and xxh64 hashes, written by :class:`data_prep.mds.MDSShardWriter`.
Shards go through a local staging directory named ``staging.tmp-<pid>-*``
(removed by the next run if this process is killed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

from titan_moe.common.units import parse_bytes
from data_prep.mds import MDSShardWriter
from titan_moe.common.contract import columns
from titan_moe.common.storage import TMP_MARK, StorageError, Store

READ_TOKENS = 1 << 21  # tokens per read of a work file (4 MiB of uint16)
TAIL_PREFIX = "tail."


@dataclass
class Written:
    shards: list[dict]  # MDS index entries, in stream order
    tokens: int  # real tokens written as full sequences (group) or in total (tail)
    sequences: int
    tail: np.ndarray  # group: the < seq_len leftover tokens; tail: empty
    padded_tokens: int = 0


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


class _Shards:
    """An MDS shard writer staging locally and publishing each shard to ``out/<source>/``."""

    def __init__(self, *, source: str, out: Store, staging_root: str, seq_len: int, dtype: str,
                 shard_size: int | str, prefix: str):
        os.makedirs(staging_root, exist_ok=True)
        self.staging = tempfile.mkdtemp(prefix=f"staging{TMP_MARK}{os.getpid()}-", dir=staging_root)

        def publish(basename: str) -> None:
            out.put_file(os.path.join(self.staging, basename), f"{source}/{basename}", move=True)

        self.writer = MDSShardWriter(self.staging, columns=columns(dtype, seq_len),
                                     size_limit=parse_bytes(shard_size, "--shard-size"), publish=publish, prefix=prefix)
        self.full_valid = np.int32(seq_len).tobytes()

    def write(self, seq: np.ndarray, num_valid: bytes | None = None) -> None:
        self.writer.write({"tokens": seq.tobytes(), "num_valid": num_valid or self.full_valid})

    def close(self) -> list[dict]:
        try:
            return self.writer.close()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def write_group(*, source: str, prefix: str, token_files: list[tuple[str, int]], tokens_store: Store,
                out: Store, staging_root: str, seq_len: int, dtype: str, shard_size: int | str,
                on_sequences: Callable[[int], None] | None = None) -> Written:
    """Publish a group's full sequences as shards; return their entries and the group's tail.

    ``token_files`` are ``(key in tokens_store, expected token count)`` in stream order.
    """
    np_dtype = np.dtype(dtype).newbyteorder("<")
    shards = _Shards(source=source, out=out, staging_root=staging_root, seq_len=seq_len, dtype=dtype,
                     shard_size=shard_size, prefix=prefix)
    sequences = tokens = 0
    carry = np.empty(0, dtype=np_dtype)
    try:
        for key, expected in token_files:
            got = 0
            for chunk in _read_tokens(tokens_store, key, np_dtype):
                got += chunk.size
                buf = np.concatenate([carry, chunk]) if carry.size else chunk
                full = buf.size // seq_len
                for i in range(full):
                    shards.write(buf[i * seq_len:(i + 1) * seq_len])
                sequences += full
                carry = buf[full * seq_len:].copy()
                if on_sequences and full:
                    on_sequences(full)
            if got != expected:
                raise StorageError(
                    f"{tokens_store.url_of(key)} holds {got} tokens but its marker says {expected}; "
                    "delete the file and its .json marker and re-run"
                )
            tokens += got
    except BaseException:
        shards.abort()
        raise
    entries = shards.close()
    return Written(shards=entries, tokens=tokens - carry.size, sequences=sequences, tail=carry)


def write_tail(*, source: str, tail: np.ndarray, out: Store, staging_root: str, seq_len: int, dtype: str,
               pad_id: int, shard_size: int | str) -> Written:
    """Cut the groups' concatenated tails into sequences (the last one padded) and publish them."""
    np_dtype = np.dtype(dtype).newbyteorder("<")
    tail = tail.astype(np_dtype, copy=False)
    shards = _Shards(source=source, out=out, staging_root=staging_root, seq_len=seq_len, dtype=dtype,
                     shard_size=shard_size, prefix=TAIL_PREFIX)
    full = tail.size // seq_len
    padded = 0
    try:
        for i in range(full):
            shards.write(tail[i * seq_len:(i + 1) * seq_len])
        rest = tail[full * seq_len:]
        if rest.size:
            padded = seq_len - rest.size
            last = np.full(seq_len, pad_id, dtype=np_dtype)
            last[: rest.size] = rest
            shards.write(last, np.int32(rest.size).tobytes())
    except BaseException:
        shards.abort()
        raise
    entries = shards.close()
    return Written(shards=entries, tokens=int(tail.size), sequences=full + (1 if padded else 0),
                   tail=np.empty(0, dtype=np_dtype), padded_tokens=padded)

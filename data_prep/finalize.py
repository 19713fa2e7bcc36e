"""Finalize: group records -> each stream's tail, ``index.json`` and manifest; then the mixture.

Runs after every file group of a source has its record in the shared work
store (``<source>/group.NNNNN.json``: the group's shard entries, counts,
per-file stats and its ``< seq_len`` tail tokens).  Publishing order keeps
every stream readable at every instant: the group shards were published
before their records; here the tail shards, then ``index.json``, then
``<source>/manifest.json`` (the stream's completion marker), then the
source's work files are deleted.  Finalizing is idempotent, so the explicit
``--finalize`` Job and a last shard that finalizes by itself may overlap.

The mixture manifest ``OUTPUT/manifest.json`` (after ``OUTPUT/tokenizer.json``) is rebuilt from **every**
complete stream in the output root (a directory with a ``manifest.json``),
not from this run's sources, and re-listed after writing until stable: two
concurrent runs with disjoint ``--sources`` cannot drop each other's streams.
"""

from __future__ import annotations

import json

import numpy as np

from data_prep.groups import FileGroup
from data_prep.mds import index_json
from data_prep.writer import write_tail
from titan_moe.common.contract import INDEX, MANIFEST, TOKENIZER, FileStats, SourceManifest, dumps, mixture_manifest
from titan_moe.common.errors import ConfigError
from titan_moe.common.storage import StorageError, Store

RECORD_FORMAT = "titan-moe-group/1"


class IncompleteRun(RuntimeError):
    """``--finalize`` found file groups no shard has written yet."""


class EmptySources(RuntimeError):
    """Sources (or the whole run) whose every document was rejected: zero tokens."""


def check_compatible(what: str, obj: dict, *, seq_len: int, tokenizer_sha256: str, eos_id: int) -> None:
    """Refuse to mix streams of another ``seq_len`` or tokenizer in one output root."""
    if obj.get("seq_len") != seq_len:
        raise ConfigError(
            "--seq-len",
            f"{what} was built with seq_len {obj.get('seq_len')}, this run asks for {seq_len}; "
            "write to a new OUTPUT_URL (one output root holds one sequence length)",
        )
    if obj.get("tokenizer_sha256") != tokenizer_sha256 or obj.get("eos_id") != eos_id:
        raise ConfigError(
            "--tokenizer",
            f"{what} was built with another tokenizer ({obj.get('tokenizer')}); "
            "write to a new OUTPUT_URL or pass the same --tokenizer",
        )


def read_json(store: Store, key: str) -> dict | None:
    raw = store.read_bytes(key)
    return None if raw is None else json.loads(raw)


def empty_message(empty: dict[str, dict[str, int]]) -> str:
    parts = []
    for source, reasons in sorted(empty.items()):
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "no documents"
        parts.append(f"source {source!r} yielded zero tokens (every document rejected: {why})")
    return ("; ".join(parts) + ". No index was written for it: fix or drop the input "
            "(--sources) and re-run; the manifest's rejected_lines say where the bad records are")


class Finalizer:
    """Writes the streams of complete groups and the mixture manifest."""

    def __init__(self, *, out: Store, work: Store, staging_root: str, seq_len: int, tok, shard_size: int | str,
                 group_bytes: int, keep_work: bool):
        self.out, self.work, self.staging_root = out, work, staging_root
        self.seq_len, self.tok, self.shard_size = seq_len, tok, shard_size
        self.group_bytes, self.keep_work = group_bytes, keep_work

    def _check(self, what: str, obj: dict) -> None:
        check_compatible(what, obj, seq_len=self.seq_len, tokenizer_sha256=self.tok.sha256, eos_id=self.tok.eos_id)

    def record_matches(self, record: dict, group: FileGroup) -> bool:
        """A group record written by this configuration for exactly these input files."""
        return (
            record.get("format") == RECORD_FORMAT
            and record.get("seq_len") == self.seq_len
            and record.get("tokenizer_sha256") == self.tok.sha256
            and record.get("dtype") == self.tok.dtype
            and record.get("group_bytes") == self.group_bytes
            and record.get("shard_size") == str(self.shard_size)
            and [tuple(x) for x in record.get("inputs", [])] == [(f.relpath, f.size) for f in group.files]
        )

    def recorded(self, groups: list[FileGroup]) -> set[int]:
        """Indices of the groups (of one source) whose records are present (one listing, no reads)."""
        if not groups:
            return set()
        names = set(self.work.list_files(groups[0].source))
        return {g.index for g in groups if g.key.rsplit("/", 1)[1] in names}

    # -- one stream -----------------------------------------------------------
    def finalize_source(self, source: str, groups: list[FileGroup]) -> SourceManifest | dict[str, int]:
        """Write the stream; returns its manifest, or the rejection counts of a zero-token source."""
        records = []
        for g in groups:
            record = read_json(self.work, g.key)
            if record is None or not self.record_matches(record, g):
                raise IncompleteRun(f"{g.describe()} has no current record in {self.work.url_of(g.key)}")
            records.append(record)
        inputs = [FileStats.from_json(f) for r in records for f in r["files"]]
        tails = [np.asarray(r["tail"], dtype=np.int64) for r in records]
        tokens = sum(int(r["tokens"]) for r in records) + sum(t.size for t in tails)
        if tokens == 0:
            reasons: dict[str, int] = {}
            for f in inputs:
                for reason, n in f.rejected_by_reason.items():
                    reasons[reason] = reasons.get(reason, 0) + n
            return reasons
        tail = write_tail(source=source, tail=np.concatenate(tails), out=self.out, staging_root=self.staging_root,
                          seq_len=self.seq_len, dtype=self.tok.dtype, pad_id=self.tok.pad_id,
                          shard_size=self.shard_size)
        shards = [entry for r in records for entry in r["shards"]] + tail.shards
        self.out.write_bytes(f"{source}/{INDEX}", index_json(shards))
        manifest = SourceManifest(
            source=source, seq_len=self.seq_len, tokenizer=self.tok.name, tokenizer_sha256=self.tok.sha256,
            eos_id=self.tok.eos_id, pad_id=self.tok.pad_id, dtype=self.tok.dtype, tokens=tokens,
            sequences=sum(int(r["sequences"]) for r in records) + tail.sequences, shards=len(shards),
            padded_tokens=tail.padded_tokens, inputs=inputs, group_bytes=self.group_bytes,
        )
        # Last write of the stream: its presence marks the stream complete.
        self.out.write_bytes(f"{source}/{MANIFEST}", dumps(manifest.to_json()))
        if not self.keep_work:
            self.work.delete_tree(source)
        return manifest

    # -- the mixture ----------------------------------------------------------
    def complete_streams(self) -> dict[str, SourceManifest]:
        """Every complete stream in the output root (compatible with this run)."""
        streams = {}
        for name in self.out.list_dirs():
            if name.startswith(("_", ".")):
                continue
            obj = read_json(self.out, f"{name}/{MANIFEST}")
            if obj is None:
                continue
            self._check(f"stream {self.out.url_of(name)}", obj)
            streams[name] = SourceManifest.from_json(obj)
        return streams

    def write_mixture(self) -> dict:
        """Rebuild ``OUTPUT/manifest.json`` from every complete stream; re-list until stable."""
        for _ in range(10):
            streams = self.complete_streams()
            if not streams:
                return {}
            mixture = mixture_manifest(
                streams, seq_len=self.seq_len, tokenizer=self.tok.name, tokenizer_sha256=self.tok.sha256,
                eos_id=self.tok.eos_id, pad_id=self.tok.pad_id, dtype=self.tok.dtype,
            )
            # The tokenizer first: a root whose manifest a reader sees has its tokenizer too.
            # Every stream was checked to share this tokenizer's sha256 (complete_streams).
            self.out.write_bytes(TOKENIZER, self.tok.json.encode())
            self.out.write_bytes(MANIFEST, dumps(mixture))
            # A stream completed by a concurrent run after our listing is in the next one.
            if set(self.complete_streams()) == set(streams):
                return mixture
        raise StorageError(f"{self.out.url_of(MANIFEST)}: the set of complete streams kept changing; re-run")

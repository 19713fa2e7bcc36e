"""The prep output as the loader sees it: ``manifest.json`` plus each stream's ``index.json``.

Everything here runs before a process group or a cache directory is touched,
so a wrong root, a missing stream or a mismatched ``seq_len`` fails at once,
with a :class:`~titan_moe.common.errors.ConfigError` naming the field and the stream.

Layout (the contract in ``titan_moe.common.contract``, written by ``titan-moe prep``)::

    ROOT/manifest.json              {"format": "titan-moe-mds/1", "seq_len", "dtype", ...,
                                     "sources": {name: {"tokens", "sequences", "proportion", ...}}}
    ROOT/<source>/index.json        MDS index: shards, columns tokens=ndarray:<dtype>:<seq_len>,
                                    num_valid=int32
    ROOT/<source>/shard.NNNNN.mds.zstd
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field as dataclass_field


from titan_moe.common import storage
from titan_moe.common import contract
from titan_moe.data.fast_streaming import gc_paused
from titan_moe.common.contract import FORMAT, INDEX, MANIFEST, TOKEN_DTYPES
from titan_moe.common.errors import ConfigError

logger = logging.getLogger(__name__)
# Preferred shard checksums, fastest first, when validate_hash = "auto".
HASH_PREFERENCE = ("xxh64", "xxh3_64", "sha1", "md5")


@dataclass(frozen=True)
class StreamInfo:
    """One source's MDS stream, as its manifest entry and index describe it."""

    name: str
    url: str
    sequences: int
    tokens: int
    proportion: float
    shard_samples: tuple[int, ...]
    """Samples per shard, in index order (the order MDS sample ids follow)."""
    hashes: tuple[str, ...]
    """Checksum algorithms every shard of the stream carries."""
    shard_files: frozenset[str] = frozenset()
    """Every raw and compressed shard file name the index lists (what a cache may hold)."""
    max_shard_bytes: int = 0
    """The largest shard's raw + compressed size: what one download may occupy in a cache."""
    index_bytes: int = 0
    """Size of index.json in bytes."""
    index_sha256: str = ""
    shard_entries: tuple[dict, ...] = dataclass_field(default=(), repr=False, compare=False)
    """The index's shard entries as parsed and checked here: the shard store builds its readers
    from them, so each rank parses an ``index.json`` once.  Entries of equal columns share
    one ``column_*`` list each (an index repeats them per shard)."""


@dataclass(frozen=True)
class PrepOutput:
    """A checked prep output: the streams a loader will read, and a digest naming this version."""

    root: str
    seq_len: int
    dtype: str
    eos_id: int
    pad_id: int
    tokenizer: str
    streams: dict[str, StreamInfo]
    """The streams that were asked for (all by default), checked."""
    listed: tuple[str, ...]
    """Every source the manifest lists."""
    digest: str
    """sha256 over seq_len, dtype, tokenizer and the read streams' index.json files (which
    carry every shard's checksum): names exactly the data read, and is untouched by a
    source added to the prep output later that this run does not read."""


def read_prep_output(root: str, *, field: str, seq_len: int, sources: list[str] | None = None,
                     sources_field: str = "") -> PrepOutput:
    with gc_paused():  # ~10^5 index entries: see fast_streaming.gc_paused
        return _read_prep_output(root, field=field, seq_len=seq_len, sources=sources, sources_field=sources_field)


def _read_prep_output(root: str, *, field: str, seq_len: int, sources: list[str] | None,
                      sources_field: str) -> PrepOutput:
    """Read and check ``root``'s manifest and the indexes of ``sources`` (all when None).

    ``field`` is the config key that named ``root`` (``data.root``,
    ``data.validation_root``); ``seq_len`` is ``[training].seq_len``, which must
    equal the streams'; ``sources_field`` is the key that named ``sources``.
    """
    manifest_url = storage.join(root, MANIFEST)
    try:
        raw = storage.read_bytes(manifest_url)
    except FileNotFoundError:
        raise ConfigError(field, f"{manifest_url} does not exist; point {field} at the output of `titan-moe prep`") from None
    except OSError as exc:
        raise ConfigError(field, f"cannot read {manifest_url}: {exc}") from exc
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(field, f"{manifest_url} is not valid JSON ({exc}); rerun `titan-moe prep`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(field, f"{manifest_url} has format {got!r}, expected {FORMAT!r}")
    for key in ("seq_len", "dtype", "sources"):
        if key not in manifest:
            raise ConfigError(field, f"{manifest_url} lacks {key!r}; rerun `titan-moe prep`")
    entries = manifest["sources"]
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(field, f"{manifest_url} lists no sources (an empty manifest); prep wrote no stream")
    if manifest["seq_len"] != seq_len:
        raise ConfigError(
            "training.seq_len",
            f"is {seq_len} but the streams under {root} hold sequences of {manifest['seq_len']} tokens; "
            f"set training.seq_len = {manifest['seq_len']} or prep the data again at {seq_len}",
        )
    dtype = manifest["dtype"]
    if dtype not in TOKEN_DTYPES:
        raise ConfigError(field, f"{manifest_url} has token dtype {dtype!r}; the loader reads {TOKEN_DTYPES}")

    names = sorted(entries) if sources is None else list(sources)
    digest = hashlib.sha256(json.dumps(
        [seq_len, dtype, manifest.get("tokenizer"), manifest.get("tokenizer_sha256")]).encode())
    streams = {}
    for name in names:
        if name not in entries:
            raise ConfigError(
                f"{sources_field or field}.{name}",
                f"unknown source: {manifest_url} has {sorted(entries)}",
            )
        if int(entries[name].get("sequences", 0)) <= 0:
            # Prep keeps a source whose every record was rejected, with an empty stream.
            if sources is not None:
                raise ConfigError(
                    f"{sources_field or field}.{name}",
                    f"stream {name!r} is empty in {manifest_url} (0 sequences); drop it from the mixture or re-prep it",
                )
            logger.warning(f"{field}: stream {name!r} holds no sequences; it is left out")
            continue
        stream = _read_stream(root, name, entries[name], seq_len=seq_len, dtype=dtype, field=field)
        digest.update(name.encode() + b"\0" + stream.index_sha256.encode())
        streams[name] = stream
    if not streams:
        raise ConfigError(field, f"no stream in {manifest_url} holds any sequence; prep wrote only empty streams")
    return PrepOutput(
        root=root,
        seq_len=seq_len,
        dtype=dtype,
        eos_id=int(manifest.get("eos_id", -1)),
        pad_id=int(manifest.get("pad_id", -1)),
        tokenizer=str(manifest.get("tokenizer", "")),
        streams=streams,
        listed=tuple(sorted(entries)),
        digest=digest.hexdigest(),
    )


def _read_stream(root: str, name: str, entry: dict, *, seq_len: int, dtype: str, field: str,
                 url: str | None = None, allowed: dict[str, tuple[str, ...]] | None = None) -> StreamInfo:
    """One stream's index, checked: ``entry`` is its manifest entry (``sequences`` may be absent).

    ``allowed`` maps column -> accepted encodings (default: exactly the
    contract's columns); ``url`` overrides ``root/name``.
    """
    url = url or storage.join(root, name)
    index_url = storage.join(url, INDEX)
    try:
        index_raw = storage.read_bytes(index_url)
        index = json.loads(index_raw)
    except FileNotFoundError:
        raise ConfigError(
            field,
            f"stream {name!r} is listed in the manifest but {index_url} does not exist "
            "(an incomplete prep upload?); rerun `titan-moe prep` for it",
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(field, f"stream {name!r}: cannot read {index_url}: {exc}") from exc
    if not isinstance(index, dict) or index.get("version") != 2:
        got = index.get("version") if isinstance(index, dict) else type(index).__name__
        raise ConfigError(field, f"stream {name!r}: {index_url} has MDS index version {got!r}, expected 2; "
                                 "rewrite it with mosaicml-streaming's MDSWriter (or `titan-moe prep`)")
    shards = index.get("shards") or []
    if not shards:
        raise ConfigError(field, f"stream {name!r}: {index_url} lists no shards")
    if allowed is None:
        allowed = {column: (encoding,) for column, encoding in contract.columns(dtype, seq_len).items()}
    hash_sets: set[tuple[str, ...]] = set()  # distinct checksum sets (one per shard in the index)
    files: set[str] = set()
    max_bytes = 0
    # The index repeats the column and hash lists per shard: a shard equal to the one checked
    # last is not checked again, and its lists become the checked ones (one copy, ~4 fewer
    # objects per shard for the loader to keep and the GC to walk).
    shared: dict[str, object] = {}
    for i, shard in enumerate(shards):
        for key in _SHARED_KEYS:
            value = shard.get(key)
            if key not in shared or value != shared[key]:
                shared = {key: shard.get(key) for key in _SHARED_KEYS}
                _check_columns(shard, allowed, i, name=name, seq_len=seq_len, dtype=dtype, field=field)
                break
        else:
            for key in _SHARED_KEYS:
                if key in shard:
                    shard[key] = shared[key]
        raw, zipped = shard.get("raw_data"), shard.get("zip_data")
        hash_sets.add(tuple((zipped or raw or {}).get("hashes", {})))
        size = 0
        for part in (raw, zipped):
            if part:
                files.add(part["basename"])
                size += int(part.get("bytes", 0))
        max_bytes = max(max_bytes, size)
    shard_samples = tuple(int(s["samples"]) for s in shards)
    sequences = int(entry.get("sequences", sum(shard_samples)))
    if sum(shard_samples) != sequences:
        raise ConfigError(
            field,
            f"stream {name!r}: the manifest says {sequences} sequences but {index_url} holds "
            f"{sum(shard_samples)}; the manifest is stale -- rerun `titan-moe prep`",
        )
    return StreamInfo(
        name=name,
        url=url,
        sequences=sequences,
        tokens=int(entry.get("tokens", 0)),
        proportion=float(entry.get("proportion", 0.0)),
        shard_samples=shard_samples,
        hashes=tuple(sorted(set.intersection(*map(set, hash_sets)))) if hash_sets else (),
        shard_files=frozenset(files),
        max_shard_bytes=max_bytes,
        index_bytes=len(index_raw),
        index_sha256=hashlib.sha256(index_raw).hexdigest(),
        shard_entries=tuple(shards),
    )


_SHARED_KEYS = ("column_names", "column_encodings", "column_sizes", "hashes", "version", "format")


def _check_columns(shard: dict, allowed: dict[str, tuple[str, ...]], i: int, *, name: str, seq_len: int,
                   dtype: str, field: str) -> None:
    """Shard ``i`` of stream ``name`` is an MDS v2 shard storing each ``allowed`` column as accepted."""
    if shard.get("version") != 2 or shard.get("format") != "mds":
        raise ConfigError(field, f"stream {name!r} shard {i} is {shard.get('format')!r} version "
                                 f"{shard.get('version')!r}, expected 'mds' version 2; re-prep the stream")
    columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
    for column, encodings in allowed.items():
        if columns.get(column) not in encodings:
            raise ConfigError(
                field,
                f"stream {name!r} shard {i} stores column {column!r} as {columns.get(column)!r}, "
                f"expected {' or '.join(map(repr, encodings))} (seq_len {seq_len}, dtype {dtype}); "
                "the stream and its manifest disagree -- re-prep the stream",
            )


def pick_hash(setting: str, streams: list[StreamInfo], field: str = "data.validate_hash") -> str | None:
    """The checksum to verify downloads with: ``setting``, or the best every stream carries."""
    common = set.intersection(*(set(s.hashes) for s in streams)) if streams else set()
    if setting == "":
        return None
    if setting == "auto":
        return next((h for h in HASH_PREFERENCE if h in common), None)
    if setting not in common:
        raise ConfigError(field, f"{setting!r} is not carried by every stream (they share {sorted(common)}); use one of those, \"auto\" or \"\"")
    return setting

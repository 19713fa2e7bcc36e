"""llm-foundry MDS datasets as loader input (``[data] format = "llm-foundry"``).

llm-foundry's ``convert_dataset_hf.py`` / ``convert_dataset_json.py`` with
``--concat_tokens N`` write one MDS folder (one ``index.json``) per split,
each sample a column ``tokens`` of exactly N token ids: ``ndarray:int32`` in
current versions, ``bytes`` (int64 ids, ``np.ndarray.tobytes()``) in older
ones.  There is no manifest and no ``num_valid`` (every token is real: the
converter drops the final partial sequence).

``data.root`` is either one such folder (one source, named after the
folder) or a folder whose subfolders each hold an ``index.json`` (one
source per subfolder).  Sources mix by their sample counts (``mixture =
"natural"``) or by an explicit table, exactly as for prep output;
``training.seq_len`` must equal N (checked on the first sample read, since
the index does not record the ndarray's length).
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from titan_moe.common import storage
from titan_moe.common.contract import INDEX
from titan_moe.data.manifest import PrepOutput, _read_stream
from titan_moe.common.errors import ConfigError

FORMAT_NAME = "llm-foundry"
TOKEN_ENCODINGS = ("ndarray:int32", "ndarray:int64", "ndarray:uint16", "ndarray:uint32", "bytes")
BYTES_DTYPE = "int64"  # what llm-foundry's `bytes` tokens hold (its token_encoding_type default)


def _folders(root: str, field: str) -> dict[str, str]:
    """source name -> folder URL/path holding an index.json."""
    fs, path = storage.filesystem(root)
    path = path.rstrip("/")
    if fs.exists(posixpath.join(path, INDEX) if storage.is_url(root) else f"{path}/{INDEX}"):
        return {posixpath.basename(path) or "data": root}
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise ConfigError(field, f"{root} does not exist; point it at an llm-foundry MDS folder") from None
    found = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["type"] == "directory" and fs.exists(f"{e['name'].rstrip('/')}/{INDEX}"):
            found[name] = storage.join(root, name)
    if not found:
        raise ConfigError(field, f"{root} holds no {INDEX} nor subfolders with one; with data.format = "
                                 f"\"{FORMAT_NAME}\" point it at the folder llm-foundry's converter wrote (e.g. .../train)")
    return dict(sorted(found.items()))


def read_foundry_output(root: str, *, field: str, seq_len: int, sources: list[str] | None = None,
                        sources_field: str = "") -> PrepOutput:
    """The checked llm-foundry dataset under ``root`` as the loader's :class:`PrepOutput`."""
    folders = _folders(root, field)
    names = sorted(folders) if sources is None else list(sources)
    streams = {}
    digest = hashlib.sha256(json.dumps([FORMAT_NAME, seq_len]).encode())
    for name in names:
        if name not in folders:
            raise ConfigError(f"{sources_field or field}.{name}", f"unknown source: {root} has {sorted(folders)}")
        stream = _read_stream(root, name, {}, seq_len=seq_len, dtype="int32", field=field, url=folders[name],
                              allowed={"tokens": TOKEN_ENCODINGS})
        digest.update(name.encode() + b"\0" + stream.index_sha256.encode())
        streams[name] = stream
    total = sum(s.sequences for s in streams.values())
    streams = {n: type(s)(**{**s.__dict__, "tokens": s.sequences * seq_len, "proportion": s.sequences / total})
               for n, s in streams.items()}
    return PrepOutput(root=root, seq_len=seq_len, dtype="int32", eos_id=-1, pad_id=-1, tokenizer="",
                      streams=streams, listed=tuple(sorted(folders)), digest=digest.hexdigest())

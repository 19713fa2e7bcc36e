"""The tokenizer a run was trained with: where it lives, how it is read, how a checkpoint keeps it.

Training reads pre-tokenized MDS streams and never needs a tokenizer; eval and
export do.  They find it from the run config alone, in this order:

1. ``[model].hf_assets_path/tokenizer.json`` when that file exists (the user's
   explicit choice; torchtitan's field for it);
2. ``<checkpoint folder>/tokenizer.json``: the trainer copies the data's
   tokenizer there when the run starts (:func:`record`), so a checkpoint stays
   scoreable after its data moved or was deleted;
3. ``[data].root/tokenizer.json``, written by ``titan-moe prep`` next to its
   manifest (``titan_moe.common.contract.TOKENIZER``);
4. the local path recorded in an older prep manifest (``"tokenizer"``).

Every location may be a local path or an object-store URL: all reads go
through ``titan_moe.common.storage``.  Why a copy in the checkpoint folder and not a
URL in checkpoint metadata: a URL breaks when the data is moved, and the copy
is ~2 MB next to checkpoints of hundreds of MB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from titan_moe.common import storage
from titan_moe.common.contract import MANIFEST, TOKENIZER


@dataclass(frozen=True)
class RunTokenizer:
    """A resolved tokenizer: its ``tokenizer.json`` text, where it came from, and prep's EOS id if known."""

    text: str
    source: str
    eos_id: int | None


def _read(url: str) -> bytes | None:
    """The bytes at a local path or URL, or None when nothing is there (other failures raise StorageError)."""
    parent, _, name = url.rstrip("/").rpartition("/") if storage.is_url(url) else url.rpartition("/")
    if not name:
        return None
    return storage.Store(parent or ".").read_bytes(name)


def _prep_manifest(data_root: str) -> dict:
    raw = _read(storage.join(data_root, MANIFEST))
    return json.loads(raw) if raw else {}


def checkpoint_folder(job: Any) -> str:
    """``<job.dump_folder>/<checkpoint.folder>`` as the trainer resolves it (an absolute or URL folder stays)."""
    folder = job.checkpoint.folder
    if storage.is_url(folder) or folder.startswith("/"):
        return folder
    return storage.join(job.job.dump_folder, folder)


def candidates(job: Any, checkpoint: str | None = None) -> list[str]:
    """Where the run's tokenizer.json may be, in the order they are tried (see the module docstring)."""
    found = []
    assets = job.model.hf_assets_path
    if assets:
        found.append(storage.join(assets, TOKENIZER))
    found.append(storage.join(checkpoint or checkpoint_folder(job), TOKENIZER))
    if job.data.root:
        found.append(storage.join(job.data.root, TOKENIZER))
    return found


def find(job: Any, checkpoint: str | None = None) -> RunTokenizer | None:
    """The run's tokenizer, or None when no location holds one.

    ``checkpoint`` is the checkpoint folder eval or export reads (default: the
    run config's own).  A store that cannot be reached raises StorageError:
    "no tokenizer" must mean that, not a network failure.
    """
    manifest = _prep_manifest(job.data.root) if job.data.root else {}
    eos = manifest.get("eos_id")
    eos = int(eos) if eos is not None else None
    for url in candidates(job, checkpoint):
        raw = _read(url)
        if raw is not None:
            return RunTokenizer(raw.decode(), url, eos)
    legacy = manifest.get("tokenizer")  # older manifests: the path prep was given, valid on prep's machine
    if legacy and not storage.is_url(legacy):
        raw = _read(storage.join(legacy, TOKENIZER) if not legacy.endswith(".json") else legacy)
        if raw is not None:
            return RunTokenizer(raw.decode(), legacy, eos)
    return None


def record(job: Any) -> str | None:
    """Copy ``[data].root/tokenizer.json`` into the run's checkpoint folder; returns where, or None.

    Called once by rank 0 when training starts.  Data without a tokenizer
    (synthetic tokens, llm-foundry folders, roots prepped before prep wrote
    one) records nothing; an identical copy already there is left alone.
    """
    if not job.data.root or not job.checkpoint.enable:
        return None
    raw = _read(storage.join(job.data.root, TOKENIZER))
    if raw is None:
        return None
    store = storage.Store(checkpoint_folder(job))
    if store.read_bytes(TOKENIZER) != raw:
        store.write_bytes(TOKENIZER, raw)
    return store.url_of(TOKENIZER)

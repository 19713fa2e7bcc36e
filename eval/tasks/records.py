"""Reading task data: HF on-disk datasets, JSONL files, or the hub.

Every record comes with a *location* a person can open ("boolq.jsonl:17",
".../validation[row 3]") so a bad line can be reported precisely, skipped,
and counted instead of failing a long eval run or silently vanishing.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from titan_moe.errors import ConfigError

MAX_LISTED_SKIPS = 20  # how many skipped locations the JSON report spells out


class BadRecord(ValueError):
    """A record that cannot be scored; `field` names what is wrong with it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


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


def is_hf_disk_split(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


def read_hf_disk(path: Path) -> Iterator[Record]:
    """A `Dataset.save_to_disk` directory: state.json lists Arrow IPC *stream* files."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    files = [path / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise ConfigError(str(path), "state.json lists no data files; is this a complete save_to_disk copy?")
    row = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:  # some writers use the random-access file format
                table = pa.ipc.open_file(source).read_all()
        for obj in table.to_pylist():
            yield f"{path}[row {row}]", obj, None
            row += 1


def read_hub(hub_id: str, config: str | None, split: str) -> Iterator[Record]:
    import datasets  # lazy: heavy, and only for online use

    ds = datasets.load_dataset(hub_id, config, split=split)
    for row, obj in enumerate(ds):
        yield f"hf://{hub_id}/{config or ''}:{split}[row {row}]", dict(obj), None


def read_any(path: Path) -> Iterator[Record]:
    if is_hf_disk_split(path):
        return read_hf_disk(path)
    if path.is_file():
        return read_jsonl(path)
    raise ConfigError(str(path), "not a save_to_disk split directory (with state.json) nor a JSONL file")


# -- locating a split -----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def hub_allowed() -> bool:
    """The hub is tried only when no local copy exists, HF offline mode is off and
    huggingface.co answers within a second or two (otherwise `datasets` retries
    for half a minute per split before giving up)."""
    if os.environ.get("HF_DATASETS_OFFLINE", "0") == "1" or os.environ.get("HF_HUB_OFFLINE", "0") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=1.5).close()
    except OSError:
        return False
    return True


def candidate_paths(data_root: Path, task: str, hub_ids: list[tuple[str, str | None]], split: str) -> list[Path]:
    """Where a split may lie under --data-root, in the order tried.

    `<root>/<hub id>/<config or "none">/<split>` is how `save_to_disk` copies are
    kept (e.g. `boolq/none/validation`, `hails/mmlu_no_train/anatomy/dev`);
    JSONL with the same fields may sit at `<root>/<task>/<split>.jsonl[.gz]`.
    """
    paths: list[Path] = []
    for hub_id, config in hub_ids:
        base = data_root / hub_id
        paths += [base / (config or "none") / split, base / split] if config is None else [base / config / split]
    for suffix in (".jsonl", ".jsonl.gz", ".json.gz"):
        paths.append(data_root / task / f"{split}{suffix}")
    paths.append(data_root / task / split)
    return list(dict.fromkeys(paths))  # hub id == task name would list some twice


def open_split(
    task: str,
    split: str,
    hub_ids: list[tuple[str, str | None]],
    data_root: Path | None,
    override: Path | None = None,
    allow_hub: bool | None = None,
) -> tuple[str, Iterator[Record]]:
    """(description, records) of the first available copy of `task`'s `split`."""
    if override is not None:
        override = Path(override)
        if override.is_dir() and not is_hf_disk_split(override) and (override / split).exists():
            override = override / split
        if not override.exists():
            raise ConfigError(f"--task-data {task}", f"{override} does not exist")
        return str(override), read_any(override)
    tried: list[str] = []
    if data_root is not None:
        for path in candidate_paths(Path(data_root), task, hub_ids, split):
            if is_hf_disk_split(path) or path.is_file():
                return str(path), read_any(path)
            tried.append(str(path))
    if allow_hub is None:
        allow_hub = hub_allowed()
    if allow_hub and hub_ids:
        hub_id, config = hub_ids[0]
        try:
            records = list(read_hub(hub_id, config, split))
        except Exception as exc:  # offline, unknown id, ...: say what was tried
            tried.append(f"hub {hub_id} ({type(exc).__name__}: {exc})")
        else:
            return f"hf://{hub_id}/{config or ''}:{split}", iter(records)
    raise ConfigError(
        f"--data-root ({task})",
        f"no copy of the {split!r} split found; tried:\n  " + "\n  ".join(tried or ["(no --data-root given)"])
        + "\nsave it with datasets' save_to_disk under --data-root, or pass --task-data "
        f"{task}=PATH (a save_to_disk split or a JSONL file)",
    )


def require(record: dict, name: str, kind: type | tuple[type, ...]) -> object:
    """record[name] checked for presence and type; a BadRecord naming the field otherwise."""
    if name not in record or record[name] is None:
        raise BadRecord(name, "missing")
    value = record[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRecord(name, f"expected {want}, got {type(value).__name__} {value!r:.40}")
    return value

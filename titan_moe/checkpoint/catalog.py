"""What is in a checkpoint folder: steps, which are complete, which are damaged.

A checkpoint ``FOLDER/step-N/`` is *committed* when it holds ``COMMITTED``, a
JSON marker that rank 0 writes only after the (async) save finished on every
rank.  The marker lists every file of the checkpoint with its size, so a
checkpoint truncated or partly deleted afterwards is recognised without
reading it.  It also records the torch / torchtitan / titan-moe versions that
wrote the checkpoint (``versions``; absent in markers from before they were
recorded), since a resume under other versions is not bit-exact.  Object stores have no atomic rename, so the marker, written
last, is what makes a checkpoint visible.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from titan_moe.common import storage

MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointInfo:
    step: int
    path: str
    committed: bool
    problem: str | None  # why it cannot be loaded, None when it can
    size_bytes: int
    saved_at: float | None
    versions: dict[str, str] = field(default_factory=dict)  # empty: the marker records none

    @property
    def loadable(self) -> bool:
        return self.committed and self.problem is None


def step_path(folder: str, step: int) -> str:
    return storage.join(folder, f"step-{step}")


def commit(path: str, step: int, world_size: int = 1, seconds: float = 0.0,
           versions: dict[str, str] | None = None) -> int:
    """Write ``path``'s COMMITTED marker listing every file and its size; returns the file count.

    Call once, on one process, after every rank finished writing ``path``.
    ``versions``: the libraries the checkpoint was written with (``titan_moe.common.versions``).
    """
    files = storage.file_sizes(path)
    files.pop(MARKER, None)
    storage.write_json(storage.join(path, MARKER), {
        "step": step, "saved_at": time.time(), "seconds": round(seconds, 3), "world_size": world_size, "files": files,
        **({"versions": versions} if versions else {}),
    })
    return len(files)


def inspect(folder: str, step: int) -> CheckpointInfo:
    path = step_path(folder, step)
    sizes = storage.file_sizes(path)
    marker = sizes.pop(MARKER, None)
    size = sum(sizes.values())
    if marker is None:
        return CheckpointInfo(step, path, False, "no COMMITTED marker (save interrupted or still running)", size, None)
    try:
        meta = storage.read_json(storage.join(path, MARKER))
    except (ValueError, OSError) as exc:
        return CheckpointInfo(step, path, True, f"unreadable COMMITTED marker: {exc}", size, None)
    for name, expected in sorted(meta.get("files", {}).items()):
        actual = sizes.get(name)
        if actual != expected:
            what = "missing" if actual is None else f"{actual} bytes, expected {expected}"
            return CheckpointInfo(step, path, True, f"file {name} is {what}", size, meta.get("saved_at"))
    return CheckpointInfo(step, path, True, None, size, meta.get("saved_at"), dict(meta.get("versions") or {}))


def list_checkpoints(folder: str) -> list[CheckpointInfo]:
    """All ``step-N`` checkpoints in ``folder``, oldest first."""
    fs, root = storage.filesystem(folder)
    if not fs.exists(root):
        return []
    steps = []
    for entry in fs.ls(root, detail=False):
        match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            steps.append(int(match.group(1)))
    return [inspect(folder, step) for step in sorted(steps)]

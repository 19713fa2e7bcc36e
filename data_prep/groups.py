"""File groups: the unit a stream is written in, and the unit shards of a run share out.

A source's input files, in sorted path order, are cut into consecutive
**groups** of at least ``--group-size`` input bytes (the last may be smaller;
one file never spans groups).  The grouping depends only on the file list and
``--group-size``, never on the number of machines or workers, and the stream
is defined over groups (``writer.py``), so the output is the same bytes for
any ``--shard I/N`` and any ``--workers``.

``--shard I/N`` owns the groups :func:`assign` gives it: every group of the
run, largest first, goes to the least loaded shard (ties: lower index), a
deterministic longest-processing-time split that keeps shards within about
one group of each other in input bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from data_prep.sources import InputFile
from titan_moe.common.errors import ConfigError

DEFAULT_GROUP_SIZE = "1gb"


@dataclass(frozen=True)
class FileGroup:
    source: str
    index: int  # position in the source's stream
    files: tuple[InputFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def key(self) -> str:
        """The group's record in the shared work store."""
        return f"{self.source}/group.{self.index:05}.json"

    @property
    def shard_prefix(self) -> str:
        """Its MDS shards are ``shard.<prefix><k>.mds.zstd``: group then shard number."""
        return f"{self.index:05}."

    def describe(self) -> str:
        return f"{self.source} group {self.index} ({len(self.files)} files from {self.files[0].relpath})"


def make_groups(source: str, files: list[InputFile], group_bytes: int) -> list[FileGroup]:
    """Consecutive groups of ``files`` (sorted by path), each at least ``group_bytes`` but the last."""
    groups: list[FileGroup] = []
    current: list[InputFile] = []
    size = 0
    for f in sorted(files, key=lambda f: f.relpath):
        current.append(f)
        size += f.size
        if size >= group_bytes:
            groups.append(FileGroup(source, len(groups), tuple(current)))
            current, size = [], 0
    if current:
        groups.append(FileGroup(source, len(groups), tuple(current)))
    return groups


def assign(groups: list[FileGroup], shard: int, num_shards: int) -> list[FileGroup]:
    """The groups shard ``shard`` of ``num_shards`` owns, in stream order."""
    load = [0] * num_shards
    mine = []
    for g in sorted(groups, key=lambda g: (-g.size, g.source, g.index)):
        owner = min(range(num_shards), key=lambda i: (load[i], i))
        load[owner] += g.size
        if owner == shard:
            mine.append(g)
    return sorted(mine, key=lambda g: (g.source, g.index))


def parse_shard(text: str | None, environ: dict[str, str] | None = None) -> tuple[int, int, bool]:
    """``--shard I/N`` (or Kubernetes' ``JOB_COMPLETION_INDEX`` + ``JOB_COMPLETIONS``) -> (I, N, sharded).

    ``sharded`` is False only for a plain single-machine run (no flag, no
    environment), which may keep its work files on local disk.
    """
    env = os.environ if environ is None else environ
    field = "--shard"
    if text is None:
        index, count = env.get("JOB_COMPLETION_INDEX"), env.get("JOB_COMPLETIONS")
        if index is None or count is None:
            return 0, 1, False
        text, field = f"{index}/{count}", "JOB_COMPLETION_INDEX/JOB_COMPLETIONS"
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(field, f"{text!r} is not I/N; write e.g. --shard 0/8 (shard 0 of 8)")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(field, f"{text!r}: need 0 <= I < N, e.g. 0/8 .. 7/8")
    return i, n, True

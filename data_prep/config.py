"""The settings of one ``titan-moe prep`` run, validated before any file is touched."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from titan_moe.common.errors import ConfigError
from titan_moe.common.storage import RetryPolicy
from titan_moe.common.units import parse_bytes

# The OLMoE tokenizer on the Hugging Face hub.  Tests pass the copy in
# ../shared/data/tokenizers/ instead, because the hub is not reachable there.
DEFAULT_TOKENIZER = "allenai/gpt-neox-olmo-dolma-v1_5"
DEFAULT_SEQ_LEN = 4096
# 64 MiB of uncompressed samples per shard: MosaicML's default, a few seconds
# of download per shard and few enough objects for a multi-TB source.
DEFAULT_SHARD_SIZE = "64mb"


@dataclass(frozen=True)
class PrepConfig:
    """One prep run: what to read, where to write, how to tokenize.

    Attributes:
        input_root: corpus root, local path or fsspec URL; the sources are the
            directories under ``input_root/data/`` (or directly under
            ``input_root`` when it has no ``data/``).
        output: output root, local directory or fsspec URL (``s3://...``).
        tokenizer: a ``tokenizer.json`` path, a directory holding one, or a
            Hugging Face hub id.
        seq_len: tokens per sequence.
        sources: sources to include (None: every source found).
        workers: tokenizer processes; 1 tokenizes in this process.
        shard_size: uncompressed bytes per MDS shard (``"64mb"`` or an int).
        work_dir: the work location shards of a run share: group records and
            tails (small).  Default: ``OUTPUT/_work`` for local output or a
            sharded run; a local temp directory for a single-machine run with
            remote output (nothing is uploaded needlessly).  Token files always
            stay on this machine's disk (see ``data_prep.pipeline``).
        keep_work: keep the work files after a source is complete.
        shard: this process's share, ``(I, N)``: the file groups
            ``data_prep.groups.assign`` gives shard I of N.
        sharded: True when ``--shard`` or ``JOB_COMPLETION_INDEX``/``JOB_COMPLETIONS``
            was given (the work location must then be shared).
        finalize: only finalize (tails, indexes, manifests) from the work of every shard.
        group_size: input bytes per file group (``"1gb"``): the unit written as
            soon as it is tokenized, and shared out between shards.
        retry: retry policy for object-storage writes.
        progress: show progress bars.
    """

    input_root: str
    output: str
    tokenizer: str = DEFAULT_TOKENIZER
    seq_len: int = DEFAULT_SEQ_LEN
    sources: tuple[str, ...] | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_size: int | str = DEFAULT_SHARD_SIZE  # "64mb" or bytes
    work_dir: str | None = None
    keep_work: bool = False
    retry: RetryPolicy = RetryPolicy()
    progress: bool = True
    shard: tuple[int, int] = (0, 1)
    sharded: bool = False
    finalize: bool = False
    group_size: int | str = "1gb"

    def __post_init__(self) -> None:
        if not self.input_root:
            raise ConfigError("INPUT_ROOT", "is empty; pass the corpus root (the folder holding data/<source>/)")
        if not self.output:
            raise ConfigError("OUTPUT_URL", "is empty; pass a local directory or an s3:// URL")
        if self.seq_len < 2:
            raise ConfigError("--seq-len", f"must be at least 2, got {self.seq_len}")
        if self.workers < 1:
            raise ConfigError("--workers", f"must be at least 1, got {self.workers}")
        shard_bytes = parse_bytes(self.shard_size, "--shard-size")
        # One sequence (4 bytes per id at most) plus the shard header (~1 KiB of
        # config JSON) must fit in a shard.
        minimum = 4 * self.seq_len + 8 + 1024
        if shard_bytes < minimum:
            raise ConfigError("--shard-size", f"{self.shard_size} cannot hold one {self.seq_len}-token sequence; "
                                              f"use at least {minimum} bytes (64mb is typical)")
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise ConfigError("--shard", f"{i}/{n}: need 0 <= I < N")
        if parse_bytes(self.group_size, "--group-size") < 1:
            raise ConfigError("--group-size", f"{self.group_size!r} is not a positive size; write e.g. 1gb")
        if self.retry.retries < 0 or self.retry.backoff_s < 0:
            raise ConfigError("--retries", "retries and backoff must be non-negative")
        if self.sources is not None:
            if not self.sources:
                raise ConfigError("--sources", "is empty; list sources like dclm,wiki or drop the flag")
            for name in self.sources:
                check_source_name(name, "--sources")


def check_source_name(name: str, field_name: str) -> None:
    """Source names become directory names in the output; keep them plain."""
    if not name or "/" in name or name.startswith((".", "_")):
        raise ConfigError(
            field_name,
            f"source name {name!r} is not usable as a stream directory "
            "(no '/', must not start with '.' or '_', which are reserved for work files)",
        )

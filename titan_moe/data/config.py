"""The ``[data]`` section of a run config: which MDS mixture to stream, and how.

The sweep planner writes these names, so they are a contract::

    [data]
    root = "s3://bucket/olmoe-mix/4096"    # what `titan-moe prep` wrote (or a local dir)
    mixture = "natural"                     # or {dclm = 0.9, starcoder = 0.1}
    repeat = {}                             # or {dclm = 4}: epochs per source (data reuse)
    token_budget = 0                        # tokens for the whole run; 0 = unbounded
    shuffle_seed = 17
    local_cache = ""                        # per-job, node-local cache; "" = {dump_folder}/data_cache/{host}
    cache_limit = ""                        # e.g. "200gb"; "" = never evict
    validation_root = ""                    # a second prep output, scored per source

Inputs and labels (the one convention, used by training and validation)
-----------------------------------------------------------------------
Prep stores exactly ``seq_len`` tokens per sample, and ``[training].seq_len``
must equal it.  The trainer sees::

    input  = tokens[0 : seq_len]                       (LongTensor [B, seq_len])
    labels = tokens[1 : seq_len] + [-100]              (LongTensor [B, seq_len])

so the model runs on a full ``seq_len`` window (a power of two stays a power
of two for kernels and context parallelism) and the last position, whose next
token lies in another sample, has no target.  A sample's final, padded
sequence has ``num_valid < seq_len`` real tokens; every label at position
``i >= num_valid - 1`` (its target would be padding) is -100 as well
(torchtitan's ``IGNORE_INDEX``).  That costs one label in ``seq_len`` (0.02 % at
4096), against shifting to a ``seq_len - 1`` model window.

Mixture semantics
-----------------
* ``mixture = "natural"`` and no ``repeat``: every sequence of every source
  once per epoch -- the manifest's token proportions (up to the padding of
  each source's last sequence).
* ``mixture = {source = p, ...}``: explicit proportions (sources left out get
  none; they must sum to 1).  One epoch holds ``token_budget // seq_len``
  samples, or as many as all listed sources hold when there is no budget; a
  source asked for more than it holds is repeated (each pass a fresh order).
* ``repeat = {source = r, ...}`` (with ``mixture = "natural"``; unlisted
  sources repeat 1): each unique sequence is seen ``r`` times, pass after
  pass.  With a ``token_budget`` the unique pool shrinks to fit, natural-
  proportionally across sources: ``sum_s r_s * unique_s == budget`` (the data-
  reuse setting of "Can Mixture-of-Experts Surpass Dense LLMs Under Strictly
  Equal Resources?": a fixed unique-token budget seen several times).

Proportions are met per *mixture window* (about ``mixture_window`` samples):
at every window boundary each source has drawn its exact share within
``1 + #sources / 2`` samples, every epoch ends exactly on its shares, and only
the order inside a window is random (see ``titan_moe.data.order``).  Token
shares equal sample shares up to the padding of each source's last sequence.

Resume: the loader state is one global position, the same on every rank, so
a run resumes exactly where it stopped -- on any data-parallel degree -- and
refuses (before training) a checkpoint whose data order differs.

``[training.dataloader]`` (``num_workers`` ...) does not apply: samples are
decoded in the training process (about a thousand times faster than one H200
consumes them, see ``benchmarks/loader_throughput.py``) while a background
thread downloads the shards of the next batches.  ``[validation]`` supplies
``enable``, ``freq``, ``steps`` (batches per source, -1 = all) and
``local_batch_size``; its ``dataset``/``seq_len`` are not used.

No ``from __future__ import annotations`` here: torchtitan's ConfigManager
checks ``dataclasses.is_dataclass(field.type)`` at runtime to merge and
build nested sections, which string annotations would defeat.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from titan_moe.common.errors import ConfigError
from titan_moe.common.units import parse_bytes

@dataclass
class DataConfig:
    """Where the MDS mixture lives (a local directory or an s3:// URL) and how to draw from it."""

    root: str = ""
    """The prep output: a directory or URL holding manifest.json and one stream per source."""

    mixture: str | dict[str, float] = "natural"
    """"natural" (the manifest's proportions) or a table of per-source proportions summing to 1."""

    repeat: dict[str, float] = field(default_factory=dict)
    """Per-source epochs for data-reuse runs (needs mixture = "natural"); unlisted sources: 1."""

    token_budget: int = 0
    """Tokens the run may draw (samples = token_budget // seq_len); 0 = unbounded, cycle epochs."""

    shuffle_seed: int = 17
    """Seeds the shuffle and the mixture interleaving; the whole order is a function of it."""

    local_cache: str = ""
    """This job's shard cache, on node-local disk (one per job and node).

    "" = {job.dump_folder}/data_cache/{hostname}.  Shards land under
    <cache>/<prep digest>/{train,validation}/<source>/."""

    cache_limit: str = ""
    """Evict least-recently-used shards above this size, e.g. "200gb"; "" = no limit."""

    validation_root: str = ""
    """A second prep output (same seq_len) evaluated per source every [validation].freq steps."""

    shuffle_block: int = 1 << 18
    """Samples shuffled together; shards are visited in random order, blocks keep reads local."""

    mixture_window: int = 1 << 14
    """Samples per mixture window, inside which source proportions are exact."""

    validate_hash: str = "auto"
    """Checksum shards on download: "auto" (xxh64, else sha1, from the index), a name, or ""."""

    download_timeout: float = 300.0
    """Seconds a shard download may take before it counts as failed (and is retried)."""

    predownload: int = 0
    """Samples per rank whose shards are fetched ahead in the background; 0 = 8 x batch."""

    format: str = "titan-moe"
    """"titan-moe" (`titan-moe prep` output) or "llm-foundry": MDS folders written by llm-foundry's
    convert_dataset_hf/json with --concat_tokens (see titan_moe.data.foundry)."""

    def check(self) -> None:
        """Checks that need no manifest; raises ConfigError naming the field."""
        if not self.root:
            raise ConfigError("data.root", "is empty; set it to the output of `titan-moe prep`")
        if isinstance(self.mixture, str):
            if self.mixture != "natural":
                raise ConfigError(
                    "data.mixture",
                    f"{self.mixture!r} is not a mixture; use \"natural\" or a table of "
                    "per-source proportions like {dclm = 0.9, wiki = 0.1}",
                )
        else:
            if not self.mixture:
                raise ConfigError("data.mixture", "the proportion table is empty")
            for name, value in self.mixture.items():
                _check_number(f"data.mixture.{name}", value)
            total = math.fsum(float(v) for v in self.mixture.values())
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(
                    "data.mixture",
                    f"proportions sum to {total:.6g}, not 1 "
                    f"({', '.join(f'{k}={v}' for k, v in self.mixture.items())}); rescale them",
                )
            if self.repeat:
                raise ConfigError(
                    "data.repeat",
                    "cannot be combined with explicit mixture proportions; use either "
                    "proportions (mixture = {...}) or epochs per source (repeat = {...}) "
                    "with mixture = \"natural\"",
                )
        for name, value in self.repeat.items():
            _check_number(f"data.repeat.{name}", value)
        if self.token_budget < 0:
            raise ConfigError("data.token_budget", f"is {self.token_budget}; use 0 (unbounded) or more")
        if self.shuffle_seed < 0:
            raise ConfigError("data.shuffle_seed", f"is {self.shuffle_seed}; use a non-negative integer")
        if self.shuffle_block < 1:
            raise ConfigError("data.shuffle_block", f"is {self.shuffle_block}; use at least 1")
        if self.mixture_window < 1:
            raise ConfigError("data.mixture_window", f"is {self.mixture_window}; use at least 1")
        if self.cache_limit:
            parse_bytes(self.cache_limit, "data.cache_limit")
        if self.download_timeout <= 0:
            raise ConfigError("data.download_timeout", "must be positive (seconds)")
        if self.format not in ("titan-moe", "llm-foundry"):
            raise ConfigError("data.format", f"{self.format!r} is not a format; use \"titan-moe\" or \"llm-foundry\"")
        if self.predownload < 0:
            raise ConfigError("data.predownload", "must be >= 0 (0 = 8 x local batch size)")


def _check_number(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field_name, f"{value!r} is not a number")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ConfigError(field_name, f"is {value}; it must be a finite number >= 0")

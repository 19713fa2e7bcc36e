"""``titan-moe prep``: the OLMoE mixture -> one MDS stream per source.

Usage::

    titan-moe prep INPUT_ROOT OUTPUT_URL [--tokenizer PATH_OR_HUB_ID] [--seq-len N]
                   [--sources a,b,...] [--workers N] [--shard-size 64mb]
                   [--work-dir URL] [--keep-work] [--retries N] [--retry-backoff S]
                   [--group-size 1gb] [--shard I/N | --finalize] [--no-progress]

Scale-out (one Kubernetes Indexed Job): run the same command with ``--shard I/N``
on N machines (or with ``JOB_COMPLETION_INDEX`` and ``JOB_COMPLETIONS`` set
and no ``--shard``); each writes its share of the file groups into the shared
work location, and the last one to finish finalizes.  ``--finalize`` (same
arguments otherwise) finalizes explicitly.  The output is the same bytes for
any N and any ``--workers``.

Both roots may be local paths or fsspec URLs; for S3-compatible stores other
than AWS set ``S3_ENDPOINT_URL`` (and the usual ``AWS_*`` credentials).
Exit status: 0 done (or this shard done, others pending), 1 storage failure
(re-run to resume), 2 bad arguments, 3 ``--finalize`` with groups no shard has
written, 4 a source or the whole run yielded zero tokens, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_prep.groups import parse_shard
from data_prep.config import DEFAULT_SEQ_LEN, DEFAULT_SHARD_SIZE, DEFAULT_TOKENIZER, PrepConfig
from titan_moe.common.errors import ConfigError
from titan_moe.common.storage import RetryPolicy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="titan-moe prep",
        description="Tokenize an OLMoE-mix-style corpus (data/<source>/*.json.gz|.json.zst) into "
                    "fixed-length token sequences, one MosaicML Streaming (MDS) stream per source, "
                    "plus a mixture manifest with natural proportions. Resumable: re-run the same "
                    "command after an interruption.",
    )
    p.add_argument("input_root", metavar="INPUT_ROOT", help="corpus root (local path or s3://bucket/prefix)")
    p.add_argument("output", metavar="OUTPUT_URL", help="output root (local directory or s3://bucket/prefix)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer.json path, directory holding one, or hub id (default {DEFAULT_TOKENIZER})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per sequence (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--sources", default=None, help="comma-separated sources to include (default: all found)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"uncompressed bytes per MDS shard, e.g. 64mb (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--work-dir", default=None,
                   help="work location shared by the shards of a run (group records and tails; token files stay on "
                        "local disk under $TMPDIR). Default: OUTPUT_URL/_work for local output or a sharded run, "
                        "else a local temp directory")
    p.add_argument("--keep-work", action="store_true", help="keep work files after each source is done")
    p.add_argument("--group-size", default="1gb",
                   help="input bytes per file group, the unit written as soon as it is tokenized and shared out "
                        "between shards (default 1gb; changing it changes the output)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shard", default=None, metavar="I/N",
                      help="process shard I of N (default: JOB_COMPLETION_INDEX/JOB_COMPLETIONS when both are set, "
                           "else the whole input); the last shard to finish finalizes")
    mode.add_argument("--finalize", action="store_true",
                      help="only write the remaining streams, indexes and the manifest from every shard's work")
    p.add_argument("--retries", type=int, default=RetryPolicy.retries,
                   help=f"retries of a failed object-storage write (default {RetryPolicy.retries})")
    p.add_argument("--retry-backoff", type=float, default=RetryPolicy.backoff_s,
                   help=f"first retry delay in seconds, doubling each time (default {RetryPolicy.backoff_s})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    sources = None
    if args.sources is not None:
        sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    shard_size: int | str = args.shard_size
    if isinstance(shard_size, str) and shard_size.isdigit():
        shard_size = int(shard_size)
    kwargs = {} if args.workers is None else {"workers": args.workers}
    index, count, sharded = parse_shard(args.shard)
    if args.finalize:
        sharded = True  # a finalize Job reads the work of other machines: the shared default
    return PrepConfig(
        input_root=args.input_root,
        output=args.output,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        sources=sources,
        shard_size=shard_size,
        work_dir=args.work_dir,
        keep_work=args.keep_work,
        retry=RetryPolicy(retries=args.retries, backoff_s=args.retry_backoff),
        progress=not args.no_progress,
        shard=(index, count),
        sharded=sharded,
        finalize=args.finalize,
        group_size=args.group_size,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that ``--help`` does not pay for numpy/tokenizers/streaming.
    from data_prep.pipeline import EmptySources, IncompleteRun, run_prep
    from titan_moe.common.storage import StorageError

    try:
        cfg = config_from_args(args)
        report = run_prep(cfg)
    except ConfigError as exc:
        print(f"titan-moe prep: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"titan-moe prep: error: {exc}\n(committed work is kept: re-run the same command to resume)",
              file=sys.stderr)
        return 1
    except IncompleteRun as exc:
        print(f"titan-moe prep: error: {exc}", file=sys.stderr)
        return 3
    except EmptySources as exc:
        print(f"titan-moe prep: error: {exc}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("titan-moe prep: interrupted; committed work is kept: re-run the same command to resume",
              file=sys.stderr)
        return 130
    summary = {
        "output": cfg.output,
        "shard": f"{cfg.shard[0]}/{cfg.shard[1]}",
        "finalized": not report.pending,
        "pending_groups": report.pending,
        "groups_written": report.groups_written,
        "peak_work_bytes": report.peak_work_bytes,
        "files_tokenized": report.files_tokenized,
        "files_skipped": report.files_skipped,
        "sources_written": report.sources_written,
        "sources_skipped": report.sources_skipped,
        "sources": {
            name: {k: entry[k] for k in ("tokens", "sequences", "shards", "proportion", "docs_rejected")}
            for name, entry in report.manifest.get("sources", {}).items()
        },
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Orchestration of one ``titan-moe prep`` process: its share of the file groups, then finalize.

Run order and why:

1. Resolve the tokenizer, check that the input, output and work roots can
   be listed (a missing bucket, denied credentials and an unreachable
   endpoint are told apart), remove temp files of killed earlier processes
   on this machine, and list the input once.
2. Refuse an output root holding streams of another ``seq_len``/tokenizer,
   or a finished stream made from other input files.  Skip complete sources.
3. Cut each source into file groups (``groups.py``) and take this shard's
   share.  Groups already recorded in the work store are skipped.
4. Tokenize the files of the owned groups in group order on ``--workers``
   processes (a ``spawn`` pool; ``--workers 1``: one thread here), keeping
   only about ``2 x workers`` files queued, so few groups are open at once.
   As soon as a group's files are all tokenized, a writer thread publishes
   its MDS shards and its record, then deletes its token files
   (``writer.write_group``).  Intermediate space is therefore bounded by the
   open groups, not by the source: about ``(workers + writers + 1) x`` the
   token bytes of the largest group (``RunReport.peak_work_bytes`` measures it).
5. When every group of every selected source has a record -- always for a
   single-machine run, for the last of N shards to finish, or under
   ``--finalize`` -- finalize (``finalize.py``): tails, indexes, manifests.

Where files go: token files always on this machine, in a directory of this
shard's own (``<work>/tokens-I-of-N`` for a local work dir, else
``$TMPDIR/titan-moe-prep/<hash of the work URL>/tokens-I-of-N``); group
records in the *work store* (``--work-dir``; default ``OUTPUT/_work`` for a
local output or a sharded run, where shards must share it, else the same
local temp directory: a single-machine run with remote output uploads
nothing but its output).

Any failure stops the run after the running tasks finish; everything
committed so far is reused by the next run.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue as queue_mod
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from data_prep.config import PrepConfig
from titan_moe.common.units import parse_bytes
from data_prep.finalize import RECORD_FORMAT, EmptySources, Finalizer, IncompleteRun, empty_message, read_json
from data_prep.groups import FileGroup, assign, make_groups
from data_prep.progress import Progress
from data_prep.sources import InputFile, discover
from data_prep.tokenization import load_tokenizer
from data_prep.work import Worker, WorkSettings, init_process, marker_key, run_in_process, token_key
from data_prep.writer import write_group
from titan_moe.common.contract import INDEX, MANIFEST, FileStats, SourceManifest, dumps
from titan_moe.common.errors import ConfigError
from titan_moe.common.storage import Store, filesystem, is_url
from titan_moe.common.temp_files import remove_dead_temp_files

WORK_DIR = "_work"
# Called after each input file is done (tests use it to interrupt a run).
FileDoneHook = Callable[[InputFile, FileStats, bool], None]


@dataclass
class RunReport:
    """What a run did; ``manifest`` is the mixture manifest it wrote ({} when it did not finalize)."""

    manifest: dict
    files_tokenized: int = 0
    files_skipped: int = 0
    groups_written: int = 0
    groups_skipped: int = 0
    sources_written: list[str] = field(default_factory=list)
    sources_skipped: list[str] = field(default_factory=list)
    pending: dict[str, list[int]] = field(default_factory=dict)
    """Groups (per source) no shard has recorded yet; non-empty means not finalized."""
    peak_work_bytes: int = 0
    """Most token bytes this process held in work files at once."""
    temp_files_removed: int = 0


def local_dir_for(url: str) -> str:
    """This machine's directory for the token files of work location ``url``."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "titan-moe-prep", digest)


def default_work_url(cfg: PrepConfig) -> str:
    if cfg.work_dir:
        return cfg.work_dir
    out = Store(cfg.output)
    if not out.remote or cfg.sharded:
        return out.url_of(WORK_DIR)
    return local_dir_for(out.url)


class _Run:
    def __init__(self, cfg: PrepConfig, on_file_done: FileDoneHook | None):
        self.cfg = cfg
        self.on_file_done = on_file_done
        self.tok = load_tokenizer(cfg.tokenizer)
        self.out = Store(cfg.output, cfg.retry)
        self.work = Store(default_work_url(cfg), cfg.retry)
        # Each shard its own token dir: shards sharing a machine never touch each other's
        # files, and a re-run of the same shard reuses what it tokenized.
        base = self.work.root if not self.work.remote else local_dir_for(self.work.url)
        self.tokens = Store(os.path.join(base, "tokens-{}-of-{}".format(*cfg.shard)))
        Store(cfg.input_root, cfg.retry).check_access("INPUT_ROOT")
        self.out.check_access("OUTPUT_URL")
        self.work.check_access("--work-dir")
        self.report = RunReport(manifest={})
        for root in {base, *([] if self.out.remote else [self.out.root])}:
            self.report.temp_files_removed += len(remove_dead_temp_files(root))
        in_fs, in_root = filesystem(cfg.input_root, retries=cfg.retry.attempts)
        self.files = discover(in_fs, in_root, cfg.sources)
        self.group_bytes = parse_bytes(cfg.group_size, "--group-size")
        self.groups = {s: make_groups(s, files, self.group_bytes) for s, files in self.files.items()}
        # Local, and for a local output on its filesystem: publishing a shard is a rename.
        self.finalizer = Finalizer(out=self.out, work=self.work, staging_root=self.tokens.path("_staging"),
                                   seq_len=cfg.seq_len, tok=self.tok, shard_size=cfg.shard_size,
                                   group_bytes=self.group_bytes, keep_work=cfg.keep_work)

    # -- checks -----------------------------------------------------------------
    def _complete(self, source: str) -> SourceManifest | None:
        obj = read_json(self.out, f"{source}/{MANIFEST}")
        if obj is None:
            return None
        self.finalizer._check(f"stream {self.out.url_of(source)}", obj)
        manifest = SourceManifest.from_json(obj)
        have = [(f.path, f.size) for f in manifest.inputs]
        want = [(f.relpath, f.size) for f in self.files[source]]
        if have != want:
            raise ConfigError(
                "INPUT_ROOT",
                f"stream {self.out.url_of(source)} is complete but was built from other input files "
                f"({len(have)} files then, {len(want)} now, or sizes changed); "
                f"remove {self.out.url_of(source)} to rebuild it, or write to a new OUTPUT_URL",
            )
        return manifest

    # -- the run ------------------------------------------------------------------
    def run(self) -> RunReport:
        todo = []
        for source in self.files:
            if self._complete(source) is None:
                todo.append(source)
            else:
                self.report.sources_skipped.append(source)
        if not self.cfg.finalize:
            index, count = self.cfg.shard
            mine = assign([g for s in todo for g in self.groups[s]], index, count)
            self._write_groups(mine)
        pending = {}
        for source in todo:
            have = self.finalizer.recorded(self.groups[source])
            missing = [g.index for g in self.groups[source] if g.index not in have]
            if missing:
                pending[source] = missing
        self.report.pending = pending
        self._tidy_local_dirs(self.tokens)
        if pending:
            if self.cfg.finalize:
                raise IncompleteRun(
                    "cannot finalize: no shard has written " + "; ".join(
                        f"{s} groups {v[:10]}{' ...' if len(v) > 10 else ''}" for s, v in pending.items())
                    + f" (records under {self.work.url}); run every --shard I/N process of the run first")
            return self.report  # another shard is still at work; it (or --finalize) finalizes
        empty = {}
        for source in todo:
            try:
                result = self.finalizer.finalize_source(source, self.groups[source])
            except (IncompleteRun, OSError, RuntimeError):
                # A concurrent finalizer (the last shard and the --finalize Job) may have
                # completed the stream and removed its work files under us.
                if self._complete(source) is None:
                    raise
                continue
            if isinstance(result, SourceManifest):
                self.report.sources_written.append(source)
                if self.cfg.progress:
                    print(f"{source}: done: {result.sequences:,} sequences in {result.shards} shards, "
                          f"{result.tokens:,} tokens", file=sys.stderr)
            else:
                empty[source] = result
        self.report.manifest = self.finalizer.write_mixture()
        self._tidy_local_dirs(self.work)
        if empty:
            raise EmptySources(empty_message(empty))
        if not self.report.manifest:
            raise EmptySources("the run yielded zero tokens: no complete stream in " + self.out.url)
        return self.report

    def _tidy_local_dirs(self, store: Store) -> None:
        """Remove the empty directories finished groups leave under a local ``store``."""
        if self.cfg.keep_work or store.remote:
            return
        for dirpath, _, _ in sorted(os.walk(store.root), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(dirpath)  # only succeeds when empty: other sources' work stays
            except OSError:
                pass

    # -- this shard's groups ------------------------------------------------------
    def _write_groups(self, mine: list[FileGroup]) -> None:
        cfg = self.cfg
        todo: list[FileGroup] = []
        by_source: dict[str, list[FileGroup]] = {}
        for g in mine:
            by_source.setdefault(g.source, []).append(g)
        for source, groups in by_source.items():
            have = self.finalizer.recorded(groups)
            for g in groups:
                record = read_json(self.work, g.key) if g.index in have else None
                if record is not None and self.finalizer.record_matches(record, g):
                    self.report.groups_skipped += 1
                    self.report.files_skipped += len(g.files)
                else:
                    todo.append(g)
        if not todo:
            return
        # An index.json left by an interrupted finalize must not outlive the shards it names.
        for source in sorted({g.source for g in todo}):
            self.out.delete(f"{source}/{MANIFEST}")
            self.out.delete(f"{source}/{INDEX}")
        _GroupRun(self, todo).run()


class _GroupRun:
    """Tokenize the files of ``groups`` on workers; write each group as soon as it is complete."""

    def __init__(self, run: _Run, groups: list[FileGroup]):
        self.r = run
        self.cfg = run.cfg
        self.groups = groups
        self.itemsize = np.dtype(run.tok.dtype).itemsize
        self.files = {}
        for g in groups:
            self.files.setdefault(g.source, []).extend(g.files)
        self.progress = Progress(self.files, self.cfg.progress)
        self.stats: dict[int, dict[str, FileStats]] = {i: {} for i in range(len(groups))}
        self.remaining = {i: len(g.files) for i, g in enumerate(groups)}
        self.live_bytes = 0

    def run(self) -> None:
        cfg, tok = self.cfg, self.r.tok
        settings = WorkSettings(
            input_url=cfg.input_root, work_url=self.r.tokens.url, retry=cfg.retry,
            tokenizer_json=tok.json, tokenizer_sha256=tok.sha256, eos_id=tok.eos_id, dtype=tok.dtype,
        )
        tasks = [(i, f) for i, g in enumerate(self.groups) for f in sorted(g.files, key=lambda f: -f.size)]
        in_process = cfg.workers == 1 or len(tasks) == 1
        writers = max(1, min(8, cfg.workers // 4 + 1))
        ctx = multiprocessing.get_context("spawn")
        updates = queue_mod.Queue() if in_process else ctx.Queue()
        if in_process:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, like each pool worker
            worker = Worker(settings, progress=lambda *u: updates.put(u), tokenizer=tok.tokenizer)
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prep-tokenize")
            submit = lambda f: pool.submit(worker.run, f)  # noqa: E731
        else:
            pool = ProcessPoolExecutor(max_workers=min(cfg.workers, len(tasks)), mp_context=ctx,
                                       initializer=init_process, initargs=(settings, updates))
            submit = lambda f: pool.submit(run_in_process, f)  # noqa: E731
        writer_pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="prep-write")
        # Files submitted ahead: keeps pool workers busy while keeping few groups open.
        queued = 1 if in_process else 2 * cfg.workers

        def drain() -> None:
            while True:
                try:
                    self.progress.update(*updates.get_nowait())
                except queue_mod.Empty:
                    return

        tokenizing: dict[Future, tuple[int, InputFile]] = {}
        writing: dict[Future, int] = {}
        nxt = 0
        try:
            while nxt < len(tasks) or tokenizing or writing:
                while nxt < len(tasks) and len(tokenizing) < queued:
                    i, f = tasks[nxt]
                    tokenizing[submit(f)] = (i, f)
                    nxt += 1
                done, _ = wait([*tokenizing, *writing], timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    if future in writing:
                        i = writing.pop(future)
                        future.result()  # a failed upload stops the run here
                        self._group_written(i)
                        continue
                    i, f = tokenizing.pop(future)
                    stats, skipped = future.result()
                    if self._file_done(i, f, stats, skipped):
                        writing[writer_pool.submit(self._write, i)] = i
            drain()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            writer_pool.shutdown(wait=True, cancel_futures=True)
            self.progress.close()
            if not in_process:
                updates.close()
                updates.join_thread()

    def _file_done(self, i: int, f: InputFile, stats: FileStats, skipped: bool) -> bool:
        """Record a tokenized file; True when its group is complete."""
        self.stats[i][f.relpath] = stats
        self.live_bytes += stats.tokens * self.itemsize
        self.r.report.peak_work_bytes = max(self.r.report.peak_work_bytes, self.live_bytes)
        if skipped:
            self.r.report.files_skipped += 1
        else:
            self.r.report.files_tokenized += 1
        if self.r.on_file_done is not None:
            self.r.on_file_done(f, stats, skipped)
        self.remaining[i] -= 1
        return self.remaining[i] == 0

    def _group_written(self, i: int) -> None:
        g = self.groups[i]
        self.live_bytes -= sum(s.tokens for s in self.stats[i].values()) * self.itemsize
        self.r.report.groups_written += 1
        self.progress.status(g.source, f"group {g.index} written")

    def _write(self, i: int) -> None:
        """Publish group ``i``'s shards, then its record, then drop its token files."""
        g, cfg, tok = self.groups[i], self.cfg, self.r.tok
        stats = [self.stats[i][f.relpath] for f in g.files]
        self.progress.status(g.source, f"writing group {g.index}")
        written = write_group(
            source=g.source, prefix=g.shard_prefix,
            token_files=[(token_key(f), s.tokens) for f, s in zip(g.files, stats, strict=True)],
            tokens_store=self.r.tokens, out=self.r.out, staging_root=self.r.finalizer.staging_root,
            seq_len=cfg.seq_len, dtype=tok.dtype, shard_size=cfg.shard_size,
        )
        record = {
            "format": RECORD_FORMAT, "seq_len": cfg.seq_len, "tokenizer_sha256": tok.sha256,
            "dtype": tok.dtype, "group_bytes": self.r.group_bytes, "shard_size": str(cfg.shard_size),
            "inputs": [[f.relpath, f.size] for f in g.files],
            "tokens": written.tokens, "sequences": written.sequences, "shards": written.shards,
            "tail": written.tail.tolist(), "files": [s.to_json() for s in stats],
        }
        self.r.work.write_bytes(g.key, dumps(record))
        if not cfg.keep_work:
            for f in g.files:
                self.r.tokens.delete(token_key(f))
                self.r.tokens.delete(marker_key(f))


def run_prep(cfg: PrepConfig, *, on_file_done: FileDoneHook | None = None) -> RunReport:
    """Run ``titan-moe prep`` for ``cfg``; see the module docstring for the order."""
    return _Run(cfg, on_file_done).run()


__all__ = ["EmptySources", "IncompleteRun", "RunReport", "run_prep"]

"""Orchestration: check the output, run phase 1 on workers, phase 2 per source.

Run order and why:

1. Resolve the tokenizer and list the input once, in this process.
2. Refuse (ConfigError) an output root that already holds streams made with
   another ``seq_len``/tokenizer, or a finished stream made from other input
   files: mixing them would silently corrupt a training mixture.
3. Skip sources whose ``<source>/manifest.json`` is present (complete).
4. Phase 1: every input file of the remaining sources is a task (largest
   first within a source, for load balance).  ``--workers 1`` runs them in
   this process; more use a ``spawn`` process pool (``fork`` is unsafe in a
   process that already runs threads, such as a test's S3 server).
5. As soon as all files of a source are done, phase 2 for that source runs on
   a background thread, overlapping the tokenization of the next sources.
6. The mixture manifest is written last, then work files are removed.

Any failure stops the run after the running tasks finish; everything
committed so far is reused by the next run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_mod
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from data_prep.config import PrepConfig
from data_prep.manifest import FileStats, SourceManifest, dumps, mixture_manifest
from data_prep.sources import InputFile, discover
from data_prep.storage import Store, filesystem
from data_prep.tokenization import TokenizerInfo, load_tokenizer
from data_prep.work import Worker, WorkSettings, init_process, run_in_process, token_key
from data_prep.writer import write_stream
from titan_moe.errors import ConfigError

WORK_DIR = "_work"
MIXTURE_MANIFEST = "manifest.json"

# Called after each input file is done (tests use it to interrupt a run).
FileDoneHook = Callable[[InputFile, FileStats, bool], None]


@dataclass
class RunReport:
    """What a run did; ``manifest`` is the mixture manifest it wrote."""

    manifest: dict
    files_tokenized: int = 0
    files_skipped: int = 0
    sources_written: list[str] = field(default_factory=list)
    sources_skipped: list[str] = field(default_factory=list)


class _Progress:
    """One bar per source: input bytes read, with docs/s and tokens/s.

    Rates are averages since the source's first file started; once the
    source is tokenized they freeze and a status (writing, done) follows them.
    """

    def __init__(self, files: dict[str, list[InputFile]], enabled: bool):
        width = max(len(s) for s in files) if files else 0
        self.bars = {
            source: tqdm(total=sum(f.size for f in flist), unit="B", unit_scale=True, position=i,
                         desc=source.ljust(width), disable=not enabled, dynamic_ncols=True, leave=True)
            for i, (source, flist) in enumerate(files.items())
        }
        self.start: dict[str, float] = {}
        self.docs: dict[str, int] = dict.fromkeys(files, 0)
        self.tokens: dict[str, int] = dict.fromkeys(files, 0)
        self.rates: dict[str, str] = dict.fromkeys(files, "")
        self.state: dict[str, str] = dict.fromkeys(files, "")

    def _show(self, source: str, refresh: bool) -> None:
        text = "; ".join(part for part in (self.rates[source], self.state[source]) if part)
        self.bars[source].set_postfix_str(text, refresh=refresh)

    def update(self, source: str, nbytes: int, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        start = self.start.setdefault(source, now)
        self.docs[source] += docs
        self.tokens[source] += tokens
        elapsed = max(now - start, 1e-6)
        self.rates[source] = f"{self.docs[source] / elapsed:,.0f} docs/s, {self.tokens[source] / elapsed:,.0f} tok/s"
        self._show(source, refresh=False)
        self.bars[source].update(nbytes)

    def status(self, source: str, text: str) -> None:
        self.state[source] = text
        self._show(source, refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@contextmanager
def _single_core_tokenizer():
    """``--workers 1`` tokenizes here on one core, like each pool worker does."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _read_json(store: Store, key: str) -> dict | None:
    raw = store.read_bytes(key)
    return None if raw is None else json.loads(raw)


def _check_compatible(what: str, obj: dict, cfg: PrepConfig, tok: TokenizerInfo) -> None:
    if obj.get("seq_len") != cfg.seq_len:
        raise ConfigError(
            "--seq-len",
            f"{what} was built with seq_len {obj.get('seq_len')}, this run asks for {cfg.seq_len}; "
            "write to a new OUTPUT_URL (one output root holds one sequence length)",
        )
    if obj.get("tokenizer_sha256") != tok.sha256 or obj.get("eos_id") != tok.eos_id:
        raise ConfigError(
            "--tokenizer",
            f"{what} was built with another tokenizer ({obj.get('tokenizer')}); "
            "write to a new OUTPUT_URL or pass the same --tokenizer",
        )


class _Run:
    def __init__(self, cfg: PrepConfig, on_file_done: FileDoneHook | None):
        self.cfg = cfg
        self.on_file_done = on_file_done
        self.tok = load_tokenizer(cfg.tokenizer)
        self.out = Store(cfg.output, cfg.retry)
        self.work = Store(cfg.work_dir or self.out.url_of(WORK_DIR), cfg.retry)
        self.out.require_bucket("OUTPUT_URL")
        self.work.require_bucket("--work-dir")
        in_fs, in_root = filesystem(cfg.input_root, internal_retries=cfg.retry.attempts)
        self.files = discover(in_fs, in_root, cfg.sources)
        self.report = RunReport(manifest={})

    # -- checks -----------------------------------------------------------------
    def _complete(self, source: str) -> SourceManifest | None:
        obj = _read_json(self.out, f"{source}/manifest.json")
        if obj is None:
            return None
        _check_compatible(f"stream {self.out.url_of(source)}", obj, self.cfg, self.tok)
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

    def _previous_mixture(self) -> dict[str, SourceManifest]:
        """Complete sources from earlier runs into this root (kept in the mixture)."""
        old = _read_json(self.out, MIXTURE_MANIFEST)
        if old is None:
            return {}
        _check_compatible(f"mixture {self.out.url_of(MIXTURE_MANIFEST)}", old, self.cfg, self.tok)
        kept = {}
        for source in old.get("sources", {}):
            if source in self.files:
                continue
            obj = _read_json(self.out, f"{source}/manifest.json")
            if obj is not None:
                kept[source] = SourceManifest.from_json(obj)
        return kept

    # -- phase 2 ----------------------------------------------------------------
    def _finalize(self, source: str, stats: dict[str, FileStats], progress: _Progress) -> SourceManifest:
        files = self.files[source]
        inputs = [stats[f.relpath] for f in files]
        staging = self.out.local_scratch(WORK_DIR)
        progress.status(source, "writing MDS shards")
        written = [0]

        def on_sequences(n: int) -> None:
            written[0] += n
            if written[0] % 1000 < n:
                progress.status(source, f"writing MDS: {written[0]:,} sequences")

        result = write_stream(
            source=source,
            token_files=[(token_key(f), s.tokens) for f, s in zip(files, inputs, strict=True)],
            work=self.work,
            out=self.out,
            staging=staging,
            seq_len=self.cfg.seq_len,
            dtype=self.tok.dtype,
            pad_id=self.tok.pad_id,
            shard_size=self.cfg.shard_size,
            on_sequences=on_sequences,
        )
        manifest = SourceManifest(
            source=source, seq_len=self.cfg.seq_len, tokenizer=self.tok.name,
            tokenizer_sha256=self.tok.sha256, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
            dtype=self.tok.dtype, tokens=result.tokens, sequences=result.sequences,
            shards=result.shards, padded_tokens=result.padded_tokens, inputs=inputs,
        )
        # Last write of the stream: its presence marks the stream complete.
        self.out.write_bytes(f"{source}/manifest.json", dumps(manifest.to_json()))
        if not self.cfg.keep_work:
            self.work.delete_tree(source)
        progress.status(source, f"done: {result.sequences:,} sequences in {result.shards} shards, "
                                f"{result.tokens:,} tokens")
        return manifest

    # -- phase 1 ----------------------------------------------------------------
    def run(self) -> RunReport:
        complete: dict[str, SourceManifest] = {}
        todo: dict[str, list[InputFile]] = {}
        for source, files in self.files.items():
            manifest = self._complete(source)
            if manifest is None:
                todo[source] = files
            else:
                complete[source] = manifest
                self.report.sources_skipped.append(source)
        previous = self._previous_mixture()

        if todo:
            complete.update(self._process(todo))
        # The mixture manifest: everything complete in this root, proportions over all of it.
        mixture = mixture_manifest(
            {**previous, **complete}, seq_len=self.cfg.seq_len, tokenizer=self.tok.name,
            tokenizer_sha256=self.tok.sha256, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
            dtype=self.tok.dtype,
        )
        self.out.write_bytes(MIXTURE_MANIFEST, dumps(mixture))
        self._tidy_work_root()
        self.report.manifest = mixture
        return self.report

    def _tidy_work_root(self) -> None:
        """Remove the empty directories finished sources leave in a local work dir."""
        for store in (self.work, self.out):
            if store.remote or self.cfg.keep_work:
                continue
            root = self.work.root if store is self.work else store.path(WORK_DIR)
            for dirpath, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
                try:
                    os.rmdir(dirpath)  # only succeeds when empty: other sources' work stays
                except OSError:
                    pass

    def _process(self, todo: dict[str, list[InputFile]]) -> dict[str, SourceManifest]:
        cfg = self.cfg
        settings = WorkSettings(
            input_url=cfg.input_root, work_url=self.work.url, retry=cfg.retry,
            tokenizer_json=self.tok.json, tokenizer_sha256=self.tok.sha256,
            eos_id=self.tok.eos_id, dtype=self.tok.dtype,
        )
        tasks = [f for files in todo.values() for f in sorted(files, key=lambda f: -f.size)]
        remaining = {source: len(files) for source, files in todo.items()}
        stats: dict[str, dict[str, FileStats]] = {source: {} for source in todo}
        progress = _Progress(todo, cfg.progress)
        finals: dict[str, Future] = {}
        finalizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prep-finalize")

        def file_done(f: InputFile, file_stats: FileStats, skipped: bool) -> None:
            stats[f.source][f.relpath] = file_stats
            if skipped:
                self.report.files_skipped += 1
            else:
                self.report.files_tokenized += 1
            if self.on_file_done is not None:
                self.on_file_done(f, file_stats, skipped)
            remaining[f.source] -= 1
            if remaining[f.source] == 0:
                finals[f.source] = finalizer.submit(self._finalize, f.source, stats[f.source], progress)

        try:
            if cfg.workers == 1 or len(tasks) == 1:
                with _single_core_tokenizer():
                    worker = Worker(settings, progress=progress.update, tokenizer=self.tok.tokenizer)
                    for f in tasks:
                        file_done(f, *worker.run(f))
                        _raise_failed(finals)
            else:
                self._run_pool(settings, tasks, progress, file_done, finals)
            manifests = {source: finals[source].result() for source in todo}
        finally:
            finalizer.shutdown(wait=True, cancel_futures=True)
            progress.close()
        self.report.sources_written.extend(todo)
        return manifests

    def _run_pool(self, settings: WorkSettings, tasks: list[InputFile], progress: _Progress,
                  file_done: Callable, finals: dict[str, Future]) -> None:
        ctx = multiprocessing.get_context("spawn")
        updates = ctx.Queue()
        pool = ProcessPoolExecutor(max_workers=min(self.cfg.workers, len(tasks)), mp_context=ctx,
                                   initializer=init_process, initargs=(settings, updates))

        def drain() -> None:
            while True:
                try:
                    progress.update(*updates.get_nowait())
                except queue_mod.Empty:
                    return

        try:
            pending = {pool.submit(run_in_process, f): f for f in tasks}
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    f = pending.pop(future)
                    file_done(f, *future.result())
                _raise_failed(finals)
            drain()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            updates.close()
            updates.join_thread()


def _raise_failed(finals: dict[str, Future]) -> None:
    """Stop early when a finished source failed to write (e.g. the store is down)."""
    for future in finals.values():
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()


def run_prep(cfg: PrepConfig, *, on_file_done: FileDoneHook | None = None) -> RunReport:
    """Run ``titan-moe prep`` for ``cfg``; see the module docstring for the order."""
    return _Run(cfg, on_file_done).run()


__all__ = ["RunReport", "run_prep", "WORK_DIR", "MIXTURE_MANIFEST"]

"""Tokens/s of ``titan-moe prep`` against raw batch tokenization, same cores.

    python -m benchmarks.prep_throughput [--docs 20000] [--files 16] [--workers 1,2] [--shards N]
                                          [--group-size 1gb]

For each worker count W it measures, on one generated corpus:

* **raw**: the tokenizer's ``encode_batch`` over the documents' texts, already
  decoded and in memory, in batches of 512 (prep's batch size), in a fresh
  process whose Rust thread pool has W threads (``RAYON_NUM_THREADS=W``);
* **prep**: ``run_prep(workers=W)`` end to end on the compressed files: pool
  start-up, decompression, JSON, tokenization, token files, MDS shards,
  hashes, manifests.

With ``--shards N`` the prep side is N ``titan-moe prep --shard I/N``
processes at once (each with W workers; the last one finalizes), against raw
with N x W threads: tokens/s per core on the same footing.  Each row also
prints the peak intermediate token bytes a process held (its file groups in
flight; ``RunReport.peak_work_bytes``) next to the whole corpus's token bytes,
which is what a tokenize-everything-first design would hold.

Both count the same tokens (document tokens plus one EOS per document), so
``ratio = prep tok/s / raw tok/s = raw time / prep time``; the aim is >= 0.8.
Raw and prep alternate ``--repeats`` times per worker count (raw, prep, raw,
prep, ...); the ratio is taken per repeat and printed as a median with its
interval (``titan_moe.common.bench_stats``).
The corpus is words drawn from the tokenizer's own vocabulary with
log-normal document lengths, half the files gzip and half zstd, in two
sources.  Timings on a shared machine are noisy: run it on an idle one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from titan_moe.common import bench_stats

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO / ".." / "shared" / "data" / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"

RAW_SCRIPT = r"""
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_str(open(sys.argv[1]).read())
texts = [json.loads(line) for line in open(sys.argv[2])]
batch = int(sys.argv[3])
tok.encode_batch(texts[:batch], add_special_tokens=False)  # warm-up: thread pool, caches
start = time.perf_counter()
n = 0
for i in range(0, len(texts), batch):
    n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + batch], add_special_tokens=False))
elapsed = time.perf_counter() - start
print(json.dumps({"tokens": n + len(texts), "seconds": elapsed}))
"""


def make_corpus(root: Path, tokenizer_json: str, docs: int, files: int, seed: int = 0) -> list[str]:
    """Write ``files`` files under root/data/{web,code}; return the texts in order."""
    rng = random.Random(seed)
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    words = [w[1:] for w in vocab if w.startswith("\u0120") and w[1:].isalpha()][:20000]
    punct = [".", ",", ".", "\n", ";", ":", "!", "?", "\n\n"]
    texts = []
    per_file = max(1, docs // files)
    for f in range(files):
        source = "web" if f % 2 == 0 else "code"
        lines = []
        for _ in range(per_file):
            n_words = max(5, int(rng.lognormvariate(5.5, 0.8)))  # median ~250 words
            parts = []
            for _ in range(n_words):
                parts.append(rng.choice(words))
                if rng.random() < 0.08:
                    parts.append(rng.choice(punct))
            text = " ".join(parts)
            texts.append(text)
            lines.append(json.dumps({"id": f"{f}-{len(lines)}", "text": text}))
        blob = ("\n".join(lines) + "\n").encode()
        folder = root / "data" / source
        folder.mkdir(parents=True, exist_ok=True)
        if f % 4 < 2:
            (folder / f"part-{f:04}.json.gz").write_bytes(gzip.compress(blob, compresslevel=6))
        else:
            (folder / f"part-{f:04}.json.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(blob))
    return texts


def raw_speed(tokenizer_path: Path, texts_path: Path, workers: int, batch: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true" if workers > 1 else "false")
    out = subprocess.run([sys.executable, "-c", RAW_SCRIPT, str(tokenizer_path), str(texts_path), str(batch)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prep_speed(corpus: Path, out: Path, tokenizer: str, workers: int, seq_len: int, shards: int,
               group_size: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if shards == 1:
        from data_prep.config import PrepConfig
        from data_prep.pipeline import run_prep

        start = time.perf_counter()
        report = run_prep(PrepConfig(input_root=str(corpus), output=str(out), tokenizer=tokenizer, seq_len=seq_len,
                                     workers=workers, progress=False, group_size=group_size))
        elapsed = time.perf_counter() - start
        tokens = sum(s["tokens"] for s in report.manifest["sources"].values())
        return {"tokens": tokens, "seconds": elapsed, "peak_work_bytes": report.peak_work_bytes}
    # N processes as N machines would run them (same command, --shard I/N).
    cmd = [sys.executable, "-m", "titan_moe.cli", "prep", str(corpus), str(out), "--tokenizer", tokenizer,
           "--seq-len", str(seq_len), "--workers", str(workers), "--group-size", group_size, "--no-progress"]
    start = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/{shards}"], stdout=subprocess.PIPE, text=True)
             for i in range(shards)]
    summaries = [json.loads(p.communicate()[0]) for p in procs]
    elapsed = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit("a shard process failed")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"tokens": sum(s["tokens"] for s in manifest["sources"].values()), "seconds": elapsed,
            "peak_work_bytes": max(s["peak_work_bytes"] for s in summaries)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prep_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1 and all cores)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--shards", type=int, default=1, help="concurrent --shard I/N processes (default 1)")
    p.add_argument("--group-size", default="1gb", help="prep --group-size (default 1gb)")
    p.add_argument("--repeats", type=int, default=5, help="runs of raw and of prep per worker count, alternating")
    p.add_argument("--tokenizer", default=str(SHARED_TOKENIZER) if SHARED_TOKENIZER.exists() else None,
                   help="tokenizer.json path (default: the shared OLMoE copy)")
    args = p.parse_args(argv)
    if args.tokenizer is None:
        p.error("--tokenizer: no shared tokenizer copy found; pass a tokenizer.json path")
    cores = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, cores})

    from data_prep.tokenization import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        tmp_path = Path(tmp)
        texts = make_corpus(tmp_path / "corpus", tok.json, args.docs, args.files)
        texts_path = tmp_path / "texts.jsonl"
        texts_path.write_text("".join(json.dumps(t) + "\n" for t in texts))
        tok_path = tmp_path / "tokenizer.json"
        tok_path.write_text(tok.json)
        size = sum(f.stat().st_size for f in (tmp_path / "corpus").rglob("*") if f.is_file())
        print(f"corpus: {len(texts)} docs in {args.files} files ({size / 2**20:.1f} MiB compressed), "
              f"seq_len {args.seq_len}, {cores} cores")
        print(f"shards {args.shards}, group size {args.group_size}")
        print(f"{args.repeats} repeats per worker count, raw and prep alternating; tok/s/core are medians, "
              f"ratio is the median of the per-repeat ratios with its interval")
        print(f"{'workers':>7} {'cores':>5} {'raw tok/s/core':>15} {'prep tok/s/core':>16} {'ratio (interval)':>24} "
              f"{'peak work MiB':>14} {'all tokens MiB':>15}")
        itemsize = 2 if tok.dtype == "uint16" else 4
        for w in workers:
            cores_used = w * args.shards
            runs = bench_stats.interleave(
                {"raw": lambda _: raw_speed(tok_path, texts_path, cores_used, batch=512),
                 "prep": lambda _: prep_speed(tmp_path / "corpus", tmp_path / f"out-{w}", args.tokenizer, w,
                                              args.seq_len, args.shards, args.group_size)},
                args.repeats,
                lambda i, r: print(f"  workers {w}, repeat {i + 1}/{args.repeats}: ratio "
                                   f"{r['raw']['seconds'] / r['prep']['seconds']:.3f}", flush=True))
            raw, prep = runs["raw"], runs["prep"]
            assert all(p["tokens"] == r["tokens"] for p, r in zip(prep, raw)), (prep, raw)
            tokens = raw[0]["tokens"]
            # ratio = prep tok/s / raw tok/s = raw seconds / prep seconds, per repeat.
            ratio = bench_stats.ratio_interval([r["seconds"] for r in raw], [p["seconds"] for p in prep]).interval
            raw_tps = tokens / statistics.median(r["seconds"] for r in raw) / cores_used
            prep_tps = tokens / statistics.median(p["seconds"] for p in prep) / cores_used
            spread = f"{ratio.median:.2f} ({ratio.low:.2f}-{ratio.high:.2f}, {ratio.coverage:.0%})"
            peak = max(p["peak_work_bytes"] for p in prep)
            print(f"{w:>7} {cores_used:>5} {raw_tps:>15,.0f} {prep_tps:>16,.0f} {spread:>24} "
                  f"{peak / 2**20:>14.2f} {tokens * itemsize / 2**20:>15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

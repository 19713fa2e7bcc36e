"""Loader startup time and peak memory per rank at OLMoE-mix scale, against streaming's own lookup.

    python -m benchmarks.loader_startup [--sources 6] [--shards 150000] [--samples 1000000000] [--old-scale 0.1]

Fabricates a prep output -- ``manifest.json`` plus one ``index.json`` per
source listing ``--shards`` shards holding ``--samples`` sequences in all --
with no data files (startup reads only manifests and indexes).  Each
measurement runs in a fresh process, as one rank, after its imports:

* **new**: what a rank does before its first batch -- read and check the
  manifest and indexes, plan the mixture and order, open the shard store
  (MosaicML ``StreamingDataset`` with the O(shards) ``ShardSpanner`` and
  shard readers built on first read), look up the shards of the first batches;
* **old**: the same with streaming's stock ``Stream`` (downloads and parses
  ``index.json`` again, one reader per shard) and ``Spanner`` (one int64 per sample).

The three measurements run ``--repeats`` times, interleaved (new full, new
small, old small, new full, ...); each ratio is taken per repeat and printed
as a median with its interval (``titan_moe.common.bench_stats``).  It prints wall
time and the peak-RSS increase over the process after its
imports (``ru_maxrss``).  The old path does not fit a small machine at full
size (~9 GB per rank), so it runs on an index ``--old-scale`` times the size
(the new path too, for a same-size ratio) and is extrapolated linearly in
samples to full size -- its cost is linear in samples by construction
(``np.repeat`` over every sample).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from titan_moe.common import bench_stats

SEQ_LEN = 4096


def fabricate(root: Path, sources: int, shards: int, samples: int) -> None:
    """manifest.json + <source>/index.json only; shard entries as prep writes them."""
    from data_prep.mds import index_json
    from titan_moe.common.contract import FORMAT, columns

    cols = columns("uint16", SEQ_LEN)
    names = sorted(cols)
    config = {"version": 2, "format": "mds", "compression": "zstd", "hashes": ["sha1", "xxh64"],
              "size_limit": 1 << 26, "column_names": names, "column_encodings": [cols[n] for n in names],
              "column_sizes": [2 * SEQ_LEN, 4]}
    per_source = shards // sources
    entries = {}
    for s in range(sources):
        name = f"source{s:02}"
        (root / name).mkdir(parents=True)
        n_samples = samples // sources
        base, extra = divmod(n_samples, per_source)
        shard_list = []
        for k in range(per_source):
            n = base + (1 if k < extra else 0)
            raw = n * (2 * SEQ_LEN + 8)
            shard_list.append({**config, "samples": n,
                               "raw_data": {"basename": f"shard.{k:05}.{k:05}.mds", "bytes": raw,
                                            "hashes": {"sha1": "0" * 40, "xxh64": "0" * 16}},
                               "zip_data": {"basename": f"shard.{k:05}.{k:05}.mds.zstd", "bytes": raw // 3,
                                            "hashes": {"sha1": "0" * 40, "xxh64": "0" * 16}}})
        (root / name / "index.json").write_bytes(index_json(shard_list))
        entries[name] = {"tokens": n_samples * SEQ_LEN, "sequences": n_samples, "shards": per_source,
                         "proportion": 1 / sources}
    manifest = {"format": FORMAT, "seq_len": SEQ_LEN, "tokenizer": "fabricated", "tokenizer_sha256": "0",
                "eos_id": 0, "pad_id": 1, "dtype": "uint16", "sources": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(root: str, mode: str, cache: str) -> None:
    """One rank's startup; prints a JSON line."""
    import numpy as np
    import streaming  # noqa: F401  (imports are not startup)
    import torch  # noqa: F401

    import titan_moe.data.shard_store as store_module
    from titan_moe.data.config import DataConfig
    from titan_moe.data.setup import prepare
    from titan_moe.data.shard_store import open_store

    if mode == "old":
        from streaming import Stream, StreamingDataset

        # The stock path: streaming's Stream (deep-copied readers) and Spanner (one int64 per sample).
        store_module.streaming_dataset = StreamingDataset
        def stock_stream(*, shard_entries, **kwargs):
            del shard_entries  # the stock Stream downloads and parses index.json itself
            return Stream(**kwargs)

        store_module.indexed_stream_class = lambda: stock_stream
    before = _rss_kb()
    start = time.perf_counter()
    config = DataConfig(root=root, local_cache=cache)
    setup = prepare(config, SEQ_LEN)
    store = open_store(setup.prep, [s.name for s in setup.plan.sources], setup.cache_dir, config)
    source, sample = setup.order.take(0, 64)
    shards = [store.shard_of(int(s), int(i)) for s, i in zip(source, sample)]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store.close()
    print(json.dumps({"mode": mode, "seconds": seconds, "rss_after_imports_mb": before / 1024,
                      "peak_rss_mb": peak / 1024, "startup_mb": (peak - before) / 1024,
                      "samples": int(sum(s.sequences for s in setup.prep.streams.values())),
                      "shards": int(sum(len(s.shard_samples) for s in setup.prep.streams.values())),
                      "first_shards": int(np.unique(shards).size)}))


def measure(root: Path, mode: str, tmp: Path) -> dict:
    cache = tmp / f"cache-{mode}-{root.name}"
    out = subprocess.run([sys.executable, "-m", "benchmarks.loader_startup", "--child", mode, "--root", str(root),
                          "--cache", str(cache)], capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=6)
    p.add_argument("--shards", type=int, default=150_000)
    p.add_argument("--samples", type=int, default=1_000_000_000)
    p.add_argument("--old-scale", type=float, default=0.1, help="index size the old path runs at (fraction)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the three measurements (default 5)")
    p.add_argument("--child", choices=("new", "old"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.root, args.child, args.cache)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="loader-startup-"))
    try:
        full, small = tmp / "full", tmp / "small"
        scale = args.old_scale
        fabricate(full, args.sources, args.shards, args.samples)
        fabricate(small, args.sources, round(args.shards * scale), round(args.samples * scale))

        def progress(i: int, r: dict) -> None:
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v['seconds']:.2f} s / +{v['startup_mb']:.0f} MB" for k, v in r.items()), flush=True)

        # Fresh processes, interleaved within each repeat: load drifts over the three alike.
        runs = bench_stats.interleave({"new, full size": lambda _: measure(full, "new", tmp),
                                       "new, small": lambda _: measure(small, "new", tmp),
                                       "old (stock Spanner), small": lambda _: measure(small, "old", tmp)},
                                      args.repeats, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    f = 1 / scale
    new_full, new_small, old_small = (runs[k] for k in ("new, full size", "new, small", "old (stock Spanner), small"))
    first = new_full[0]
    print(f"\nindex: {first['samples']:,} samples in {first['shards']:,} shards, {args.sources} sources; "
          f"old path measured at {new_small[0]['samples']:,} samples / {new_small[0]['shards']:,} shards; "
          f"{args.repeats} repeats, fresh processes interleaved; median (min-max)")
    print(f"{'':28}{'startup s':>20}{'startup MB':>20}{'peak RSS MB':>13}")

    def spread(values: list[float], fmt: str) -> str:
        i = bench_stats.median_interval(values)
        return f"{i.median:{fmt}} ({i.minimum:{fmt}}-{i.maximum:{fmt}})"

    for label, rs in runs.items():
        print(f"{label:<28}{spread([r['seconds'] for r in rs], '.2f'):>20}"
              f"{spread([r['startup_mb'] for r in rs], '.0f'):>20}"
              f"{statistics.median(r['peak_rss_mb'] for r in rs):>13.0f}")
    print(f"{'old, extrapolated to full':<28}{spread([r['seconds'] * f for r in old_small], '.2f'):>20}"
          f"{spread([r['startup_mb'] * f for r in old_small], '.0f'):>20}")

    def ratio(old: list[dict], new: list[dict], key: str, factor: float = 1.0) -> str:
        r = bench_stats.ratio_interval([o[key] * factor for o in old], [max(n[key], 1) if key == "startup_mb"
                                                                        else n[key] for n in new]).interval
        return f"{r.median:.1f}x ({r.low:.1f}-{r.high:.1f}x, {r.coverage:.0%} interval)"

    print(f"same size (small): old/new time {ratio(old_small, new_small, 'seconds')}, "
          f"startup memory {ratio(old_small, new_small, 'startup_mb')}")
    print(f"full size: old (extrapolated)/new time {ratio(old_small, new_full, 'seconds', f)}, "
          f"startup memory {ratio(old_small, new_full, 'startup_mb', f)}")
    worst_mb, worst_s = max(r["startup_mb"] for r in new_full), max(r["seconds"] for r in new_full)
    ok = worst_mb <= 500 and worst_s <= 5
    print(f"target <= 500 MB and <= 5 s per rank at full size, every repeat (worst {worst_mb:.0f} MB, "
          f"{worst_s:.2f} s): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

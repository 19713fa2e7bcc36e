"""Samples/s and tokens/s the streaming loader delivers, against a plain numpy memmap, and the GPU's need.

    python -m benchmarks.loader_throughput [--samples 4096] [--seq-len 4096] [--batch 8]

One generated prep output (three sources, random OLMoE-vocabulary tokens,
zstd MDS shards of ``--shard-size``) and the very same tokens in one
``uint16`` numpy memmap.  Every row of the table reads one epoch in the
loader's own order and builds the same trainer batches (int64 inputs, shifted
labels, padding masked), one data-parallel rank:

* **memmap** (the baseline): fancy-indexed reads of those rows from the memmap
  (page cache warm), then the same batch construction;
* **loader local, cold**: ``build_streaming_dataloader`` on the local prep
  output with an empty cache (shards copied, checked and decompressed on use);
* **loader local, warm**: again, shards already in the cache;
* **loader s3, cold**: from moto's S3 server on loopback, empty cache.

The last lines put those rates next to what one H200 consumes training the
OLMoE-1B-7B-like shape (``titan_moe/configs/bench_olmoe_1b7b.toml``) at 35 % MFU:
``0.35 * 989 TFLOP/s / flops_per_token`` from ``titan_moe.model.accounting``.
Every row runs ``--repeats`` times, the rows interleaved within each repeat
(cold, warm, memmap, s3, cold, ...); each row's ratio to the memmap of the
same repeat is summarised as a median with its interval
(``titan_moe.common.bench_stats``).  Numbers depend on the machine (run it on an
idle one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from titan_moe.common import bench_stats

REPO = Path(__file__).resolve().parents[1]
BENCH_CONFIG = REPO / "titan_moe" / "configs" / "bench_olmoe_1b7b.toml"
PEAK_BF16 = 989e12  # H100/H200 dense bf16 FLOP/s
MFU = 0.35
SOURCES = {"web": 0.7, "code": 0.2, "papers": 0.1}  # share of the samples


def write_data(root: Path, samples: int, seq_len: int, shard_size: str) -> np.memmap:
    """The prep output under ``root`` and the same tokens in ``root/tokens.u16`` (rows by source)."""
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    counts = {name: max(1, round(samples * share)) for name, share in SOURCES.items()}
    total = sum(counts.values())
    flat = np.memmap(root / "tokens.u16", dtype=np.uint16, mode="w+", shape=(total, seq_len))
    entries, row = {}, 0
    for name in sorted(counts):
        with MDSWriter(out=str(root / "prep" / name), compression="zstd", hashes=["sha1", "xxh64"],
                       size_limit=shard_size,
                       columns={"tokens": f"ndarray:uint16:{seq_len}", "num_valid": "int32"}) as writer:
            for _ in range(counts[name]):
                tokens = rng.integers(0, 50280, size=seq_len, dtype=np.uint16)
                flat[row] = tokens
                writer.write({"tokens": tokens, "num_valid": np.int32(seq_len)})
                row += 1
        entries[name] = {"tokens": counts[name] * seq_len, "sequences": counts[name],
                         "proportion": counts[name] / total}
    flat.flush()
    manifest = {"format": "titan-moe-mds/1", "seq_len": seq_len, "tokenizer": "bench", "eos_id": 50279,
                "pad_id": 1, "dtype": "uint16", "sources": entries}
    (root / "prep" / "manifest.json").write_text(json.dumps(manifest))
    return flat


def job_config(root: str, cache: Path, seq_len: int, batch: int):
    from titan_moe.data.config import DataConfig
    from titan_moe.run_config.job_config import parse_run_config

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f"[training]\nseq_len = {seq_len}\nlocal_batch_size = {batch}\n[data]\nroot = \"{root}\"\n")
    config = parse_run_config(["--job.config_file", f.name])
    os.unlink(f.name)
    config.data = DataConfig(root=root, local_cache=str(cache))
    return config


def time_loader(config, steps: int) -> tuple[float, list[np.ndarray]]:
    """Seconds for ``steps`` batches (build included) and each batch's (source, sample) ids."""
    from titan_moe.data.loader import build_streaming_dataloader

    start = time.perf_counter()
    loader = build_streaming_dataloader(1, 0, None, config)
    ids = []
    for _ in zip(range(steps), loader):
        ids.append(loader.last_ids.copy())
    seconds = time.perf_counter() - start
    offsets = np.cumsum([0] + [s.samples for s in loader.setup.plan.sources])[:-1]
    loader.close()
    return seconds, [offsets[b[:, 0]] + b[:, 1] for b in ids]


def time_memmap(flat: np.memmap, rows: list[np.ndarray]) -> float:
    from titan_moe.data.loader import make_batch

    start = time.perf_counter()
    for r in rows:
        tokens = flat[r].astype(np.int64)  # fancy indexing copies the rows, in the loader's order
        make_batch(tokens, np.full(len(r), flat.shape[1], dtype=np.int64))
    return time.perf_counter() - start


def gpu_need() -> tuple[int, float]:
    from titan_moe.model.accounting import describe
    from titan_moe.run_config.job_config import load_run_config
    from titan_moe.model.args import TitanMoEModelArgs

    args = TitanMoEModelArgs.from_job_config(load_run_config(BENCH_CONFIG))
    flops = describe(args, args.max_seq_len)["flops_per_token"]
    return flops, MFU * PEAK_BF16 / flops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4096, help="sequences over all sources")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="local batch size")
    parser.add_argument("--shard-size", default="16mb", help="uncompressed bytes per MDS shard")
    parser.add_argument("--no-s3", action="store_true", help="skip the loopback S3 row")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of every row, interleaved (default 5)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    try:
        flat = write_data(work, args.samples, args.seq_len, args.shard_size)
        steps = flat.shape[0] // args.batch
        root = str(work / "prep")
        cache = work / "cache_local"
        config = job_config(root, cache, args.seq_len, args.batch)
        order: list[np.ndarray] = []  # the loader's rows, which the memmap baseline reads too

        def cold(_: int) -> float:
            shutil.rmtree(cache, ignore_errors=True)
            seconds, rows = time_loader(config, steps)
            order[:] = rows
            return seconds

        def warm(_: int) -> float:
            seconds, rows = time_loader(config, steps)
            assert all((a == b).all() for a, b in zip(order, rows))
            return seconds

        runners = {"loader local, cold cache": cold, "loader local, warm cache": warm,
                   "numpy memmap": lambda _: time_memmap(flat, order)}
        with contextlib.ExitStack() as stack:
            if not args.no_s3:
                runners["loader s3 (loopback), cold cache"] = stack.enter_context(s3_runner(work, root, args, steps))

            def progress(i: int, r: dict[str, float]) -> None:
                print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()),
                      flush=True)

            # Rows interleave within each repeat, so machine load drifts over all of them alike.
            runs = bench_stats.interleave(runners, args.repeats, progress)
        baseline = runs.pop("numpy memmap")
        results = {name: bench_stats.ratio_interval(baseline, seconds) for name, seconds in runs.items()}

        samples = steps * args.batch
        tokens = samples * args.seq_len
        base_s = statistics.median(baseline)
        print(f"\n{samples} samples x {args.seq_len} tokens, batch {args.batch}, shards {args.shard_size}, 1 rank; "
              f"{args.repeats} repeats, rows interleaved; medians, vs memmap per repeat: median (interval)")
        print(f"{'':36} {'samples/s':>10} {'tokens/s':>14} {'vs memmap':>24}")
        print(f"{'numpy memmap (baseline)':36} {samples / base_s:10.1f} {tokens / base_s:14,.0f} {1.0:>24.2f}")
        for name, ratio in results.items():
            seconds = statistics.median(runs[name])
            vs = f"{ratio.median:.2f} ({ratio.low:.2f}-{ratio.high:.2f}, {ratio.interval.coverage:.0%})"
            print(f"{name:36} {samples / seconds:10.1f} {tokens / seconds:14,.0f} {vs:>24}")
        flops, need = gpu_need()
        warm_rate = tokens / statistics.median(runs["loader local, warm cache"])
        print(f"\nOLMoE-1B-7B-like ({BENCH_CONFIG.name}): {flops / 1e9:.2f} GFLOP/token; one H200 at "
              f"{MFU:.0%} MFU of {PEAK_BF16 / 1e12:.0f} TFLOP/s consumes {need:,.0f} tokens/s "
              f"= {need / args.seq_len:.1f} samples/s")
        print(f"headroom (loader local warm / GPU need): {warm_rate / need:.0f}x per data-loading process")
        if args.json:
            out = {name: {"samples_per_s": samples / statistics.median(runs[name]),
                          "tokens_per_s": tokens / statistics.median(runs[name]),
                          "vs_memmap": ratio.as_dict(), "seconds": runs[name]} for name, ratio in results.items()}
            out["memmap"] = {"samples_per_s": samples / base_s, "tokens_per_s": tokens / base_s, "seconds": baseline}
            out["gpu_need_tokens_per_s"] = need
            out["repeats"] = args.repeats
            Path(args.json).write_text(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


@contextlib.contextmanager
def s3_runner(work: Path, root: str, args, steps: int):
    """A loopback S3 server holding the prep output; yields a runner timing one cold-cache epoch from it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env = {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        for path in Path(root).rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "bench", f"prep/{path.relative_to(root).as_posix()}")
        cache = work / "cache_s3"
        config = job_config("s3://bench/prep", cache, args.seq_len, args.batch)

        def run(_: int) -> float:
            shutil.rmtree(cache, ignore_errors=True)
            return time_loader(config, steps)[0]

        yield run
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()

if __name__ == "__main__":
    raise SystemExit(main())

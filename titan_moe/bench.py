"""``titan-moe bench [CONFIG] [--nproc N] [--steps S] [--repeats R]``: training throughput and MFU vs torchtitan's MoE.

Trains the named run config with two engines on this machine, with the same
data, batch, precision and parallelism:

1. titan_moe (``-m titan_moe.train``);
2. the baseline, torchtitan 0.2.2's own qwen3 MoE at the same shape
   (``-m titan_moe.bench_baseline``);

interleaved, ``--repeats`` times each (titan_moe, baseline, titan_moe, baseline,
...), every run a fresh process of ``--steps`` steps.  A run's tokens/s is the
median over its steps after the warm-up; repeat i of titan_moe against repeat i
of the baseline gives one ratio, and the verdict comes from the median of those
ratios and its interval (``titan_moe.common.bench_stats``): ``faster`` when the whole
interval clears ``--target`` (1.1x), ``slower`` when it is all below,
``inconclusive`` when it straddles the target.  CONFIG is a path or a name
under ``titan_moe/configs/`` (default: ``bench_olmoe_1b7b`` -- 16 layers, dim 2048,
64 experts of hidden 1024, top-8, seq 4096 -- on a GPU, ``bench_cpu_small`` on
CPU).  Not a test: the numbers depend on the machine.
"""

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from titan_moe.common import bench_stats
from titan_moe.configs import shipped
from titan_moe.infra.torchrun import torchrun_command, torchrun_env
from titan_moe.run_config.job_config import load_run_config
from titan_moe.run_config.overrides import parse_args_and_overrides

# The two engines, in the order each repeat runs them.
ENGINES = {"titan_moe": "titan_moe.train", "baseline": "titan_moe.bench_baseline"}
METRICS = {"tokens/s per device": "throughput(tps)", "MFU %": "mfu(%)", "TFLOP/s per device": "tflops"}
PEAK_MEMORY = "memory/max_reserved(GiB)"  # on CPU the platform layer reports the process's peak RSS
TARGET_RATIO = 1.1
WARMUP_STEPS = 2

# One run of one engine: (engine name, repeat index) -> its per-run summary (see summarize).
Runner = Callable[[str, int], dict[str, Any]]


def resolve_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    try:
        return shipped(name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no run config {name!r}: not a file, and {exc}") from None


def summarize(rows: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One run: the median of each metric over the steps after the warm-up (robust to one stalled step)."""
    timed = [r for r in rows if r["step"] > warmup] or rows
    out: dict[str, Any] = {label: statistics.median(r[key] for r in timed) for label, key in METRICS.items()}
    if any(PEAK_MEMORY in r for r in timed):
        out["peak memory GiB"] = max(r.get(PEAK_MEMORY, 0.0) for r in timed)
    out["steps timed"] = len(timed)
    # Each timed step's tokens/s: how steady a step is inside one run.
    out["step tokens/s"] = [r[METRICS["tokens/s per device"]] for r in timed]
    out["final loss"] = rows[-1]["loss_metrics/global_avg_loss"]
    return out


def bench_overrides(steps: int, folder: Path) -> list[str]:
    """What bench sets on top of the run config (the user's own overrides come after and win)."""
    return ["--training.steps", str(steps), "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard",
            "--checkpoint.no-enable", "--job.dump_folder", str(folder)]


def process_runner(config: Path, nproc: int, steps: int, out: Path, extra: list[str]) -> Runner:
    """Each call trains one engine for ``steps`` steps in a fresh torchrun; logs and metrics kept per repeat."""

    def run(engine: str, repeat: int) -> dict[str, Any]:
        module, folder = ENGINES[engine], out / engine
        folder.mkdir(parents=True, exist_ok=True)
        metrics_file = folder / "metrics.jsonl"
        metrics_file.unlink(missing_ok=True)
        cmd = torchrun_command(module, ["--job.config_file", str(config), *bench_overrides(steps, folder), *extra],
                               nproc)
        if repeat == 0:
            print(f"[bench] {engine}: {' '.join(cmd[2:])}", flush=True)
        log_path = folder / f"train.r{repeat}.log"
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, env=torchrun_env(nproc), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{module} failed (exit {proc.returncode}); log {log_path}:\n"
                               f"{log_path.read_text()[-3000:]}")
        kept = metrics_file.rename(folder / f"metrics.r{repeat}.jsonl")
        rows = [json.loads(line) for line in kept.read_text().splitlines() if line.strip()]
        return summarize(rows, warmup=min(WARMUP_STEPS, steps - 1))

    return run


def progress_line(repeat: int, repeats: int, results: dict[str, dict[str, Any]]) -> str:
    ours, base = (results[e]["tokens/s per device"] for e in ENGINES)
    return (f"[bench] repeat {repeat + 1}/{repeats}: titan_moe {ours:,.1f} tokens/s, baseline {base:,.1f} tokens/s, "
            f"ratio {ours / base:.3f}")


def compare(run: Runner, repeats: int, target: float = TARGET_RATIO,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run both engines ``repeats`` times, interleaved; the medians, the per-pair ratios and the verdict."""
    runners = {engine: (lambda i, engine=engine: run(engine, i)) for engine in ENGINES}
    runs = bench_stats.interleave(
        runners, repeats, after_repeat=lambda i, results: progress(progress_line(i, repeats, results)))
    sides = {engine: side_summary(runs[engine]) for engine in ENGINES}
    ratio = bench_stats.ratio_interval([r["tokens/s per device"] for r in runs["titan_moe"]],
                                       [r["tokens/s per device"] for r in runs["baseline"]])
    return {"repeats": repeats, "steps_timed": runs["titan_moe"][0]["steps timed"], "target": target,
            "ratio_median": ratio.median, "ratio_low": ratio.low, "ratio_high": ratio.high,
            "ratio_coverage": ratio.interval.coverage, "ratios": list(ratio.ratios),
            "verdict": bench_stats.verdict(ratio.interval, target),
            "verdict_line": bench_stats.describe_verdict(ratio, target, "tokens/s ratio")} | sides


def side_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine over its repeats: the median of each per-run metric, with its interval, and every run."""
    out: dict[str, Any] = {}
    for label in METRICS:
        interval = bench_stats.median_interval([r[label] for r in runs])
        out[label] = interval.median
        out[f"{label} interval"] = [interval.low, interval.high]
    if all("peak memory GiB" in r for r in runs):
        out["peak memory GiB"] = max(r["peak memory GiB"] for r in runs)
    out["final loss"] = statistics.median(r["final loss"] for r in runs)
    out["runs"] = runs
    return out


def format_table(result: dict[str, Any]) -> str:
    ours, base = result["titan_moe"], result["baseline"]
    # The last column divides the two medians; the verdict uses the median of the per-pair ratios.
    lines = [f"{'median over repeats':<22}{'titan_moe':>14}{'torchtitan qwen3':>18}{'ratio':>9}"]
    for label in METRICS:
        ratio = ours[label] / base[label] if base[label] else float("nan")
        lines.append(f"{label:<22}{ours[label]:>14.4g}{base[label]:>18.4g}{ratio:>9.3f}")
    if "peak memory GiB" in ours and "peak memory GiB" in base:
        lines.append(f"{'peak memory GiB':<22}{ours['peak memory GiB']:>14.4g}{base['peak memory GiB']:>18.4g}"
                     f"{ours['peak memory GiB'] / base['peak memory GiB']:>9.3f}")
    lines.append(f"{'final loss':<22}{ours['final loss']:>14.4f}{base['final loss']:>18.4f}")
    ratios = ", ".join(f"{r:.3f}" for r in result["ratios"])
    lines.append(f"per-repeat tokens/s ratios (each repeat's pair): {ratios}")
    lines.append(result["verdict_line"])
    return "\n".join(lines)


def build_parser(gpu: bool, gpus: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titan-moe bench", description=__doc__.split("\n\n")[0],
                                     epilog="Other --section.key value pairs (or after --) override the run config.")
    parser.add_argument("config", nargs="?", default="bench_olmoe_1b7b" if gpu else "bench_cpu_small",
                        help="run config path or name of a shipped config (titan_moe/configs/)")
    parser.add_argument("--nproc", type=int, default=gpus if gpu else 1)
    parser.add_argument("--steps", type=int, default=10,
                        help=f"steps per run (the first {WARMUP_STEPS} are warm-up; default 10)")
    parser.add_argument("--repeats", type=int, default=5,
                        help=f"runs of each engine, interleaved (default 5; a verdict needs >= "
                             f"{bench_stats.MIN_REPEATS_FOR_VERDICT})")
    parser.add_argument("--target", type=float, default=TARGET_RATIO, help="tokens/s ratio to clear (default 1.1)")
    parser.add_argument("--out", default=None, help="output folder (default ./outputs/bench/CONFIG)")
    return parser


def read_command_line(argv: list[str], gpu: bool, gpus: int):
    """(options, config path, output folder, user overrides, the parsed run config of the titan_moe run)."""
    from titan_moe.common.errors import ConfigError

    parser = build_parser(gpu, gpus)
    args, extra = parse_args_and_overrides(parser, argv)
    if args.repeats < 1:
        raise ConfigError("--repeats", f"must be >= 1 (got {args.repeats}); "
                                       f"use >= {bench_stats.MIN_REPEATS_FOR_VERDICT} for a verdict")
    if args.steps <= WARMUP_STEPS:
        raise ConfigError("--steps", f"must be > {WARMUP_STEPS} (the warm-up steps are not timed); got {args.steps}")
    config = resolve_config(args.config)
    out = Path(args.out or Path("outputs") / "bench" / config.stem)
    run = load_run_config(config, [*bench_overrides(args.steps, out / "titan_moe"), *extra])
    return args, config, out, extra, run


def read_config(argv: list[str], gpu: bool = False, gpus: int = 0) -> Any:
    """The run config each of bench's runs trains (what their ranks parse)."""
    return read_command_line(argv, gpu, gpus)[-1]


def main(argv: list[str], runner: Runner | None = None) -> int:
    """``runner`` replaces the training processes (tests); by default each run is a fresh torchrun."""
    import torch

    from titan_moe.common.errors import ConfigError
    from titan_moe.run_config.preflight import plan_run

    gpu = torch.cuda.is_available()
    try:  # the same checks as `titan-moe train`, before any run is started
        args, config, out, extra, run = read_command_line(argv, gpu, torch.cuda.device_count())
        plan_run(run, args.nproc)
    except ConfigError as exc:
        print(f"titan-moe bench: invalid run config: {exc}", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name() if gpu else "CPU"
    timed = args.steps - WARMUP_STEPS
    print(f"[bench] {config.stem} on {args.nproc} x {device}: {args.repeats} repeats of each engine, interleaved; "
          f"{args.steps} steps per run ({WARMUP_STEPS} warm-up, {timed} timed)", flush=True)
    runner = runner or process_runner(config, args.nproc, args.steps, out, extra)
    result = compare(runner, args.repeats, args.target, progress=lambda line: print(line, flush=True))
    print(f"\n{config.stem} on {args.nproc} x {device}: {args.repeats} repeats x {args.steps} steps "
          f"({result['steps_timed']} timed) per engine\n{format_table(result)}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"config": str(config), "device": device, "nproc": args.nproc, "steps": args.steps} | result
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

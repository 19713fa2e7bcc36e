"""``titan-moe bench [CONFIG] [--nproc N] [--steps S]``: training throughput and MFU vs torchtitan's MoE.

Trains the named run config twice on this machine, back to back, with the same
data, batch, precision and parallelism:

1. titan_moe (``-m titan_moe.train``);
2. the baseline, torchtitan 0.2.2's own qwen3 MoE at the same shape
   (``-m titan_moe.bench_baseline``);

and prints tokens/s per device and MFU of each (the median over the steps after
the warm-up), with the ratio titan_moe / baseline.  CONFIG is a path or a name
under ``titan_moe/configs/`` (default: ``bench_olmoe_1b7b`` -- 16 layers, dim 2048,
64 experts of hidden 1024, top-8, seq 4096 -- on a GPU, ``bench_cpu_small``
on CPU).  Not a test: the numbers depend on the machine.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from titan_moe.configs import shipped
from titan_moe.job_config import load_run_config
from titan_moe.overrides import parse_args_and_overrides
from titan_moe.infra.torchrun import torchrun_command, torchrun_env

METRICS = {"tokens/s per device": "throughput(tps)", "MFU %": "mfu(%)", "TFLOP/s per device": "tflops"}


def resolve_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    try:
        return shipped(name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no run config {name!r}: not a file, and {exc}") from None


def summarize(metrics_file: Path, warmup: int) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["step"] > warmup] or rows
    # Median over steps: robust to a step stalled by other work on a shared machine.
    out = {label: statistics.median(r[key] for r in timed) for label, key in METRICS.items()}
    if any("memory/max_reserved(GiB)" in r for r in timed):  # GPU runs only
        out["peak memory GiB"] = max(r.get("memory/max_reserved(GiB)", 0.0) for r in timed)
    out["steps timed"] = len(timed)
    out["final loss"] = rows[-1]["loss_metrics/global_avg_loss"]
    return out


def run_one(module: str, config: Path, nproc: int, steps: int, folder: Path, extra: list[str]) -> dict[str, float]:
    folder.mkdir(parents=True, exist_ok=True)
    metrics_file = folder / "metrics.jsonl"
    if metrics_file.exists():
        metrics_file.unlink()
    cmd = torchrun_command(module, ["--job.config_file", str(config), *bench_overrides(steps, folder), *extra], nproc)
    env = torchrun_env(nproc)
    print(f"[bench] {module}: {' '.join(cmd[2:])}", flush=True)
    with open(folder / "train.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (folder / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{module} failed (exit {proc.returncode}); log {folder / 'train.log'}:\n{tail}")
    return summarize(metrics_file, warmup=min(2, steps - 1))


def bench_overrides(steps: int, folder: Path) -> list[str]:
    """What bench sets on top of the run config (the user's own overrides come after and win)."""
    return ["--training.steps", str(steps), "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard",
            "--checkpoint.no-enable", "--job.dump_folder", str(folder)]


def format_table(ours: dict[str, float], base: dict[str, float]) -> str:
    lines = [f"{'':<22}{'titan_moe':>14}{'torchtitan qwen3':>18}{'ratio':>9}"]
    for label in METRICS:
        ratio = ours[label] / base[label] if base[label] else float("nan")
        lines.append(f"{label:<22}{ours[label]:>14.4g}{base[label]:>18.4g}{ratio:>9.3f}")
    if "peak memory GiB" in ours and "peak memory GiB" in base:
        lines.append(f"{'peak memory GiB':<22}{ours['peak memory GiB']:>14.4g}{base['peak memory GiB']:>18.4g}"
                     f"{ours['peak memory GiB'] / base['peak memory GiB']:>9.3f}")
    lines.append(f"{'final loss':<22}{ours['final loss']:>14.4f}{base['final loss']:>18.4f}")
    return "\n".join(lines)


def build_parser(gpu: bool, gpus: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titan-moe bench", description=__doc__.split("\n\n")[0],
                                     epilog="Other --section.key value pairs (or after --) override the run config.")
    parser.add_argument("config", nargs="?", default="bench_olmoe_1b7b" if gpu else "bench_cpu_small",
                        help="run config path or name of a shipped config (titan_moe/configs/)")
    parser.add_argument("--nproc", type=int, default=gpus if gpu else 1)
    parser.add_argument("--steps", type=int, default=10 if gpu else 6, help="steps per run (the first 2 are warm-up)")
    parser.add_argument("--out", default=None, help="output folder (default ./outputs/bench/CONFIG)")
    return parser


def read_command_line(argv: list[str], gpu: bool, gpus: int):
    """(options, config path, output folder, user overrides, the parsed run config of the titan_moe run)."""
    args, extra = parse_args_and_overrides(build_parser(gpu, gpus), argv)
    config = resolve_config(args.config)
    out = Path(args.out or Path("outputs") / "bench" / config.stem)
    run = load_run_config(config, [*bench_overrides(args.steps, out / "titan_moe"), *extra])
    return args, config, out, extra, run


def read_config(argv: list[str], gpu: bool = False, gpus: int = 0) -> Any:
    """The run config each of bench's two runs trains (what their ranks parse)."""
    return read_command_line(argv, gpu, gpus)[-1]


def main(argv: list[str]) -> int:
    import torch

    from titan_moe.errors import ConfigError
    from titan_moe.preflight import check_run

    gpu = torch.cuda.is_available()
    try:  # the same checks as `titan-moe train`, before two runs are started
        args, config, out, extra, run = read_command_line(argv, gpu, torch.cuda.device_count())
        check_run(run, args.nproc)
    except ConfigError as exc:
        print(f"titan-moe bench: invalid run config: {exc}", file=sys.stderr)
        return 2

    ours = run_one("titan_moe.train", config, args.nproc, args.steps, out / "titan_moe", extra)
    base = run_one("titan_moe.bench_baseline", config, args.nproc, args.steps, out / "baseline", extra)
    table = format_table(ours, base)
    device = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"\n{config.stem} on {args.nproc} x {device}, {args.steps} steps ({ours['steps timed']} timed)\n{table}")
    (out / "summary.json").write_text(json.dumps({"config": str(config), "device": device, "nproc": args.nproc,
                                                  "titan_moe": ours, "baseline": base}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

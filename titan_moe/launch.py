"""``titan-moe train RUN.toml [--nproc N] [--] [--section.key value ...]``: train on this machine.

Checks the run config for the requested number of processes (mesh, expert
counts, batch sizes) *before* starting anything, then runs::

    torchrun --standalone --nproc_per_node N -m titan_moe.train --job.config_file RUN.toml ...

with defaults that suit one machine: one process per GPU (1 without GPUs),
a free rendezvous port, ``OMP_NUM_THREADS`` = cores / processes, and only
rank 0's output on the console (``--log-all-ranks`` shows every rank).
Arguments the launcher does not know, and everything after ``--``, are passed
to the trainer as run-config overrides (parsed by ``titan_moe.run_config.job_config``).
On a cluster, call torchrun with ``-m titan_moe.train`` directly.
"""

import argparse
import shlex
import subprocess
import sys
from typing import Any

from titan_moe.common.errors import ConfigError
from titan_moe.infra.torchrun import torchrun_command, torchrun_env
from titan_moe.run_config.overrides import parse_args_and_overrides

TRAIN_MODULE = "titan_moe.train"


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def build_command(config: str, nproc: int, overrides: list[str], log_all_ranks: bool = False,
                  max_restarts: int = 0) -> list[str]:
    return torchrun_command(TRAIN_MODULE, ["--job.config_file", config, *overrides], nproc,
                            max_restarts=max_restarts, rank0_output_only=not log_all_ranks)


def build_env(nproc: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    return torchrun_env(nproc, environ)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titan-moe train",
        description=__doc__.split("\n\n")[0],
        epilog="Any other --section.key value pairs (mixed in, or after --) override the run config, "
               "e.g. -- --training.steps 100.",
    )
    parser.add_argument("config", help="run config TOML (torchtitan JobConfig + [arch]/[moe]/[data])")
    parser.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: GPUs, or 1)")
    parser.add_argument("--log-all-ranks", action="store_true", help="show every rank's output, not just rank 0's")
    parser.add_argument("--dry-run", action="store_true", help="check the config and print the command only")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart all workers this many times after a crash; they resume from the last checkpoint")
    return parser


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return parse_args_and_overrides(build_parser(), argv)


def read_config(argv: list[str]) -> Any:
    """The run config ``titan-moe train ARGV`` trains (what every rank parses)."""
    from titan_moe.run_config.job_config import load_run_config  # torch and torchtitan: not for --help

    args, overrides = parse_command_line(argv)
    return load_run_config(args.config, overrides)


def check(config: str, nproc: int, overrides: list[str]) -> None:
    """Raise ConfigError if the run cannot work on ``nproc`` processes."""
    from titan_moe.run_config.job_config import load_run_config
    from titan_moe.run_config.preflight import plan_run

    if nproc < 1:
        raise ConfigError("--nproc", f"must be >= 1, got {nproc}")
    plan_run(load_run_config(config, overrides), nproc)


def main(argv: list[str]) -> int:
    args, overrides = None, []
    try:
        args, overrides = parse_command_line(argv)
        nproc = args.nproc if args.nproc is not None else default_nproc()
        check(args.config, nproc, overrides)
    except ConfigError as exc:
        where = f" {args.config}" if args is not None else ""
        print(f"titan-moe train: invalid run config{where}: {exc}", file=sys.stderr)
        return 2
    cmd = build_command(args.config, nproc, overrides, args.log_all_ranks, args.max_restarts)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.run(cmd, env=build_env(nproc)).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``titan-moe train RUN.toml [--nproc N] [--section.key value ...]``: train on this machine.

Checks the run config for the requested number of processes (mesh, expert
counts, batch sizes) *before* starting anything, then runs::

    torchrun --standalone --nproc_per_node N -m titan_moe.train --job.config_file RUN.toml ...

with defaults that suit one machine: one process per GPU (1 without GPUs),
a free rendezvous port, ``OMP_NUM_THREADS`` = cores / processes, and only
rank 0's output on the console (``--log-all-ranks`` shows every rank).
Arguments the launcher does not know are passed to the trainer as overrides.
On a cluster, call torchrun with ``-m titan_moe.train`` directly.
"""

import argparse
import os
import shlex
import subprocess
import sys

from titan_moe.errors import ConfigError


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def build_command(config: str, nproc: int, overrides: list[str], log_all_ranks: bool = False,
                  max_restarts: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}"]
    if not log_all_ranks:
        cmd += ["--local-ranks-filter", "0"]
    return cmd + ["-m", "titan_moe.train", "--job.config_file", config, *overrides]


def build_env(nproc: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    # torchrun would force 1 thread per process; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torch 2.11: restarted workers cannot rejoin a rendezvous store shared with the agent.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def check(config: str, nproc: int, overrides: list[str]) -> None:
    """Raise ConfigError if the run cannot work on ``nproc`` processes."""
    from titan_moe.job_config import parse_run_config
    from titan_moe.preflight import check_run

    if not os.path.isfile(config):
        raise ConfigError("config", f"no such run config file: {config}")
    if nproc < 1:
        raise ConfigError("--nproc", f"must be >= 1, got {nproc}")
    check_run(parse_run_config(["--job.config_file", config, *overrides]), nproc)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="titan-moe train",
        description=__doc__.split("\n\n")[0],
        epilog="Any other --section.key value pairs override the run config, e.g. --training.steps 100.",
    )
    parser.add_argument("config", help="run config TOML (torchtitan JobConfig + [arch]/[moe]/[data])")
    parser.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: GPUs, or 1)")
    parser.add_argument("--log-all-ranks", action="store_true", help="show every rank's output, not just rank 0's")
    parser.add_argument("--dry-run", action="store_true", help="check the config and print the command only")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart all workers this many times after a crash; they resume from the last checkpoint")
    args, overrides = parser.parse_known_args(argv)
    nproc = args.nproc if args.nproc is not None else default_nproc()
    try:
        check(args.config, nproc, overrides)
    except ConfigError as exc:
        print(f"titan-moe train: invalid run config {args.config}: {exc}", file=sys.stderr)
        return 2
    cmd = build_command(args.config, nproc, overrides, args.log_all_ranks, args.max_restarts)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.run(cmd, env=build_env(nproc)).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

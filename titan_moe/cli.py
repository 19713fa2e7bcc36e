"""The ``titan-moe`` command: one entry point, one subcommand per job.

Subcommands live in the room that owns them and are imported lazily, so
``titan-moe describe`` does not pay for importing the trainer, the data
pipeline or eval.  Each target is ``module:function`` taking ``argv`` and
returning an exit status.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "describe": ("titan_moe.describe:main", "print the parameters and FLOPs a run config builds"),
    "train": ("titan_moe.launch:main", "train a run config locally with torchrun"),
    "checkpoints": ("titan_moe.checkpoint.cli:main", "list checkpoints, export a consolidated model"),
    "bench": ("titan_moe.bench:main", "training throughput/MFU against torchtitan's own MoE"),
    "gpu-check": ("titan_moe.gpu_check:main", "prove the MoE hot path on one GPU (--smoke: toy shapes on CPU)"),
    "prep": ("data_prep.cli:main", "shard the OLMoE mixture into MDS streams"),
    "eval": ("eval.cli:main", "score a checkpoint on Paloma and downstream tasks"),
    "k8s": ("jobs.k8s.cli:main", "render Kubernetes manifests for one run"),
    "sweep": ("jobs.sweep.cli:main", "plan, launch, collect and plot design-space sweeps"),
    "demo": ("jobs.demo:main", "the whole pipeline on a laptop CPU, in minutes"),
}


def _usage() -> str:
    lines = ["usage: titan-moe <command> [args...]", "", "commands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<12} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"titan-moe: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"titan-moe: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``titan-moe k8s``: render (and check) the Kubernetes manifests of a run.

    titan-moe k8s render RUN.toml --nodes N --gpus-per-node G --image IMAGE --out DIR [--queue Q] [-- --section.key value ...]
    titan-moe k8s validate DIR --jobset-crd jobset.x-k8s.io_jobsets.yaml
"""

from __future__ import annotations

import argparse
import sys

from jobs.k8s.options import RenderOptions
from titan_moe.errors import ConfigError
from titan_moe.overrides import parse_args_and_overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titan-moe k8s", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = RenderOptions()

    r = sub.add_parser("render", help="write the manifests of one run config into a directory")
    r.add_argument("config", help="run config (torchtitan TOML)")
    # Shape and image are checked by render_run (clear ConfigError messages), not argparse.
    r.add_argument("--nodes", type=int, help="number of node pods (N)")
    r.add_argument("--gpus-per-node", type=int, help="GPUs (= torchrun processes) per node pod (G)")
    r.add_argument("--image", help="training image built from k8s/Dockerfile, e.g. registry/titan-moe:0.1.0")
    r.add_argument("--out", required=True, help="output directory (created if missing)")
    r.add_argument("--queue", help="Kueue LocalQueue name: adds kueue.x-k8s.io/queue-name")
    r.add_argument("--name", help="run / JobSet name (default: from the config file name)")
    r.add_argument("--namespace", help="namespace of every object (default: kubectl's current one)")
    r.add_argument("--pvc", dest="runs_claim", default=defaults.runs_claim,
                   help=f"ReadWriteMany claim for checkpoints + TensorBoard (default {defaults.runs_claim})")
    r.add_argument("--runs-mount", default=defaults.runs_mount, help=f"mount path of that claim ({defaults.runs_mount})")
    r.add_argument("--s3-secret", default=defaults.s3_secret,
                   help=f"Secret with the object-store credentials (default {defaults.s3_secret})")
    r.add_argument("--shm-size", help="memory-backed /dev/shm size (default 4Gi per GPU, >= 8Gi)")
    r.add_argument("--checkpoint-seconds", type=int, default=defaults.checkpoint_seconds,
                   help=f"time one checkpoint save may take, for the grace period ({defaults.checkpoint_seconds})")
    r.add_argument("--max-restarts", type=int, default=defaults.max_restarts,
                   help=f"JobSet restarts for crashes; preemptions are free ({defaults.max_restarts})")
    r.add_argument("--torchrun-restarts", type=int, default=defaults.torchrun_restarts,
                   help=f"torchrun in-pod worker restarts ({defaults.torchrun_restarts})")
    r.add_argument("--join-timeout", dest="join_timeout_s", type=int, default=defaults.join_timeout_s,
                   help=f"rendezvous join timeout in seconds ({defaults.join_timeout_s})")
    r.add_argument("--cpu", help="CPU request per node pod")
    r.add_argument("--memory", help="memory request per node pod (/dev/shm counts against it)")
    r.add_argument("--gpu-resource", default=defaults.gpu_resource, help=f"GPU resource name ({defaults.gpu_resource})")
    r.add_argument("--eval-gpus", type=int, default=defaults.eval_gpus, help="GPUs of the eval Job (1)")
    r.add_argument("--eval-tasks", default=defaults.eval_tasks, help=f"eval Job tasks ({defaults.eval_tasks})")
    r.add_argument("--eval-data", help="eval Job --data-root, on the run volume (default <runs-mount>/eval-data)")

    v = sub.add_parser("validate", help="check rendered manifests against the Kubernetes and JobSet schemas")
    v.add_argument("dir", help="a directory written by `titan-moe k8s render`")
    v.add_argument("--jobset-crd", required=True, help="the JobSet CRD YAML (jobset.x-k8s.io_jobsets.yaml)")
    v.add_argument("--kubernetes-version", default=None, help="schema version (default: the one the tests use)")
    return parser


def _render(args: argparse.Namespace, overrides: list[str]) -> int:
    from jobs.k8s.render import render_run

    option_names = (
        "name", "namespace", "runs_claim", "runs_mount", "s3_secret", "shm_size", "checkpoint_seconds",
        "max_restarts", "torchrun_restarts", "join_timeout_s", "cpu", "memory", "gpu_resource", "eval_gpus",
        "eval_tasks", "eval_data",
    )  # fmt: skip
    options = {k: getattr(args, k) for k in option_names}
    try:
        paths = render_run(args.config, args.nodes, args.gpus_per_node, args.image, args.out, args.queue,
                           overrides, **options)
    except ConfigError as exc:
        print(f"titan-moe k8s render: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    print(f"apply: kubectl apply -k {args.out}   (after training: kubectl create -f {args.out}/eval-job.yaml)")
    return 0


def _validate(args: argparse.Namespace) -> int:
    try:
        from jobs.k8s.validate import KUBERNETES_VERSION, validate_dir
    except ModuleNotFoundError as exc:
        print(f"titan-moe k8s validate: needs the dev dependencies ({exc.name}): uv sync --group dev", file=sys.stderr)
        return 2
    checked, problems = validate_dir(args.dir, args.jobset_crd, args.kubernetes_version or KUBERNETES_VERSION)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{checked} objects checked, {len(problems)} problems")
    return 1 if problems else 0


def read_config(argv: list[str]):
    """The run config ``titan-moe k8s render ARGV`` checks and ships (what every trainer rank parses)."""
    from jobs.k8s.runconfig import check_run_config

    args, overrides = parse_args_and_overrides(_parser(), argv)
    return check_run_config(args.config, args.nodes, args.gpus_per_node, overrides).job


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args, overrides = parse_args_and_overrides(parser, list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"titan-moe k8s: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return _validate(args)
    return _render(args, overrides)


if __name__ == "__main__":
    sys.exit(main())

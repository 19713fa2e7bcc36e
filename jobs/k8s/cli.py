"""``titan-moe k8s``: render (and check) the Kubernetes manifests of a run or of a prep job.

    titan-moe k8s render RUN.toml --nodes N --gpus-per-node G --image IMAGE --out DIR [--queue Q] [-- --section.key value ...]
    titan-moe k8s render-prep INPUT_ROOT OUTPUT_URL --shards N --image IMAGE --out DIR
    titan-moe k8s validate DIR [--crd-dir k8s/crds]
"""

from __future__ import annotations

import argparse
import sys

from jobs.k8s.options import CPU_PER_GPU, DEFAULT_RDMA_RESOURCE, MEMORY_PER_GPU_GI, NETWORKS, RenderOptions
from titan_moe.common.errors import ConfigError
from titan_moe.run_config.overrides import parse_args_and_overrides


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
    _add_cluster_args(r, defaults)
    r.add_argument("--network", choices=NETWORKS, default=defaults.network,
                   help="inter-node transport: tcp (pod network), infiniband (RDMA NICs), efa (AWS EFA); "
                        "RDMA adds the NIC resource, IPC_LOCK and NCCL settings (see k8s/README.md)")
    r.add_argument("--rdma-resource", help="RDMA NIC resource NAME=COUNT per pod (default: "
                   + "; ".join(f"{k}: {v}" for k, v in DEFAULT_RDMA_RESOURCE.items()) + ")")
    r.add_argument("--nccl-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra trainer environment (NCCL_*, FI_*, ...), repeatable; overrides the network defaults")
    r.add_argument("--shm-size", help="memory-backed /dev/shm size (default 4Gi per GPU, >= 8Gi)")
    r.add_argument("--data-cache-size", default=defaults.data_cache_size,
                   help=f"node-local shard cache emptyDir sizeLimit; data.cache_limit is 90%% of it "
                        f"({defaults.data_cache_size})")
    r.add_argument("--checkpoint-seconds", type=int, default=defaults.checkpoint_seconds,
                   help=f"longest checkpoint save, sizes the preemption grace period ({defaults.checkpoint_seconds})")
    r.add_argument("--step-seconds", type=int, default=defaults.step_seconds,
                   help=f"longest training step, sizes the preemption grace period ({defaults.step_seconds})")
    r.add_argument("--max-restarts", type=int, default=defaults.max_restarts,
                   help=f"JobSet restarts for failures no pod explained; preemptions, lost peers and rank "
                        f"failures are bounded by --crash-loop-limit instead ({defaults.max_restarts})")
    r.add_argument("--crash-loop-limit", type=int, default=defaults.crash_loop_limit,
                   help=f"attempts in a row without a new committed checkpoint before the run gives up "
                        f"({defaults.crash_loop_limit})")
    r.add_argument("--join-timeout", dest="join_timeout_s", type=int, default=defaults.join_timeout_s,
                   help=f"seconds nodes wait for each other at the rendezvous ({defaults.join_timeout_s})")
    r.add_argument("--cpu", help=f"CPU of a node pod, request = limit (default {CPU_PER_GPU} per GPU)")
    r.add_argument("--memory", help=f"memory of a node pod, request = limit (default {MEMORY_PER_GPU_GI}Gi per GPU; "
                                    "/dev/shm counts against it)")
    r.add_argument("--gpu-resource", default=defaults.gpu_resource, help=f"GPU resource name ({defaults.gpu_resource})")
    r.add_argument("--eval-gpus", type=int, default=defaults.eval_gpus, help="GPUs of the eval Job (1)")
    r.add_argument("--eval-tasks", default=defaults.eval_tasks, help=f"eval Job tasks ({defaults.eval_tasks})")
    r.add_argument("--eval-data", help="eval Job --data-root, on the run volume (default <runs-mount>/eval-data)")

    p = sub.add_parser("render-prep", help="write an Indexed Job running `titan-moe prep` over N pods, "
                                           "plus its finalize Job")
    p.add_argument("input_root", metavar="INPUT_ROOT", help="corpus root (s3:// URL or a path on the run volume)")
    p.add_argument("output", metavar="OUTPUT_URL", help="output root (s3:// URL or a path on the run volume)")
    p.add_argument("--shards", type=int, required=True, help="pods (completions) sharing the input files")
    p.add_argument("--image", help="image built from k8s/Dockerfile")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--queue", help="Kueue LocalQueue name")
    p.add_argument("--name", default="prep", help="Job name prefix (default prep)")
    p.add_argument("--tokenizer", help="prep --tokenizer")
    p.add_argument("--seq-len", type=int, help="prep --seq-len")
    p.add_argument("--sources", help="prep --sources a,b")
    p.add_argument("--workers", type=int, help="prep --workers per pod (default: the pod's --cpu)")
    p.add_argument("--work-dir", help="prep --work-dir: shared intermediate location (s3:// or the run volume)")
    p.add_argument("--parallelism", type=int, help="pods at once (default: all shards)")
    p.add_argument("--retries-per-shard", type=int, default=2, help="backoffLimitPerIndex (2)")
    p.add_argument("--cpu", default="8", help="CPU per pod, request = limit (8)")
    p.add_argument("--memory", default="32Gi", help="memory per pod, request = limit (32Gi)")
    _add_cluster_args(p, defaults)

    v = sub.add_parser("validate", help="check rendered manifests against the Kubernetes and JobSet schemas")
    v.add_argument("dir", help="a directory written by `titan-moe k8s render`")
    v.add_argument("--crd-dir", default=None, help="folder of CRD YAML files (default: the repository's k8s/crds)")
    v.add_argument("--kubernetes-version", default=None, help="schema version (default: the one the tests use)")
    return parser


def _add_cluster_args(p: argparse.ArgumentParser, defaults: RenderOptions) -> None:
    """Where the pods run and what they may use: the same for training and prep."""
    p.add_argument("--namespace", default=defaults.namespace,
                   help=f"namespace of every object; must hold the claim and the Secret ({defaults.namespace}, "
                        f"the one k8s/cluster creates)")
    p.add_argument("--pvc", dest="runs_claim", default=defaults.runs_claim,
                   help=f"ReadWriteMany claim for checkpoints + TensorBoard (default {defaults.runs_claim})")
    p.add_argument("--runs-mount", default=defaults.runs_mount,
                   help=f"mount path of that claim ({defaults.runs_mount})")
    p.add_argument("--s3-secret", default=defaults.s3_secret,
                   help=f"Secret with the object-store credentials, or 'none' for workload identity "
                        f"(default {defaults.s3_secret})")
    p.add_argument("--service-account", help="ServiceAccount of the pods (IRSA / Pod Identity / Workload Identity)")
    p.add_argument("--image-pull-secret", dest="image_pull_secrets", action="append", default=[],
                   help="registry Secret (kubernetes.io/dockerconfigjson), repeatable")


_CLUSTER_OPTIONS = ("namespace", "runs_claim", "runs_mount", "s3_secret", "service_account", "image_pull_secrets")


def _cluster_options(args: argparse.Namespace) -> dict:
    options = {k: getattr(args, k) for k in _CLUSTER_OPTIONS}
    options["image_pull_secrets"] = tuple(options["image_pull_secrets"])
    if options["s3_secret"] in ("none", ""):
        options["s3_secret"] = None
    return options


def _render(args: argparse.Namespace, overrides: list[str]) -> int:
    from jobs.k8s.render import render_run

    option_names = (
        "name", "network", "rdma_resource", "shm_size", "data_cache_size", "checkpoint_seconds", "step_seconds",
        "max_restarts", "crash_loop_limit", "join_timeout_s", "cpu", "memory", "gpu_resource", "eval_gpus", "eval_tasks", "eval_data",
    )  # fmt: skip
    options = {k: getattr(args, k) for k in option_names} | _cluster_options(args)
    options["nccl_env"] = tuple(args.nccl_env)
    try:
        paths = render_run(args.config, args.nodes, args.gpus_per_node, args.image, args.out, args.queue,
                           overrides, **options)
    except ConfigError as exc:
        print(f"titan-moe k8s render: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    print(f"namespace {options['namespace']}: it must hold the claim {options['runs_claim']}"
          + (f" and the Secret {options['s3_secret']}" if options["s3_secret"] else "")
          + " (kubectl apply -k k8s/cluster creates them in titan-moe)")
    print(f"apply: kubectl apply -k {args.out}   (after training: kubectl create -f {args.out}/eval-job.yaml)")
    return 0


def _render_prep(args: argparse.Namespace) -> int:
    from jobs.k8s.prep import FINALIZE_FILE, SHARDS_FILE, PrepSpec, build
    from jobs.k8s.render import write_objects

    spec_fields = ("input_root", "output", "shards", "name", "tokenizer", "seq_len", "sources", "workers",
                   "work_dir", "parallelism", "retries_per_shard", "cpu", "memory")
    try:
        spec = PrepSpec(**{k: getattr(args, k) for k in spec_fields})
        objects = build(spec, args.image, RenderOptions(**_cluster_options(args)), args.queue)
    except ConfigError as exc:
        print(f"titan-moe k8s render-prep: {exc}", file=sys.stderr)
        return 2
    for p in write_objects(objects, args.out):
        print(p)
    ns, job = args.namespace, f"{spec.name}-shards"
    print(f"run:  kubectl create -f {args.out}/{SHARDS_FILE}\n"
          f"wait: until s=$(kubectl -n {ns} get job {job} "
          f"-o jsonpath='{{.status.conditions[?(@.status==\"True\")].type}}')"
          f" && [[ $s == *Complete* || $s == *Failed* ]]; do sleep 30; done; echo $s\n"
          f"then: kubectl create -f {args.out}/{FINALIZE_FILE}   (only after Complete)")
    return 0


def _validate(args: argparse.Namespace) -> int:
    try:
        from jobs.k8s.validate import CRD_DIR, KUBERNETES_VERSION, validate_dir
    except ModuleNotFoundError as exc:
        print(f"titan-moe k8s validate: needs the dev dependencies ({exc.name}): uv sync --group dev", file=sys.stderr)
        return 2
    try:
        version = args.kubernetes_version or KUBERNETES_VERSION
        checked, problems = validate_dir(args.dir, args.crd_dir or CRD_DIR, version)
    except ValueError as exc:  # no CRDs there (an installed package has no k8s/crds)
        print(f"titan-moe k8s validate: {exc}; pass --crd-dir with the repository's k8s/crds", file=sys.stderr)
        return 2
    if checked == 0:
        print(f"titan-moe k8s validate: no manifests (*.yaml) in {args.dir}", file=sys.stderr)
        return 1
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
    if args.command == "render":
        return _render(args, overrides)
    if overrides:  # only a run config takes --section.key overrides
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    return {"render-prep": _render_prep, "validate": _validate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""Knobs of ``titan-moe k8s render`` and the checks that run before any YAML is written."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from titan_moe.common.errors import ConfigError

# -- preemption arithmetic (k8s/README.md "What happens on preemption") ---------------
# The trainer attempts its final save when, at the end of the step in flight, more
# than SAVE_FACTOR x (its last save's duration) + SAVE_SLACK_S seconds are left of
# checkpoint.preemption_grace_seconds (titan_moe.checkpoint.preemption.can_afford_save;
# tests/test_k8s_render.py checks these against the trainer's own rule).
SAVE_FACTOR = 1.5
SAVE_SLACK_S = 1.0
# After the final save: barrier, checkpointer close, process-group teardown, torchrun
# and the entrypoint exiting.  Seconds, normally; the margin keeps SIGKILL off them.
TEARDOWN_MARGIN_S = 30
# A data-cache emptyDir over its sizeLimit gets the pod evicted: streaming's own
# cache_limit stays this fraction below it (a shard in download can overshoot).
CACHE_LIMIT_FRACTION = 0.9

RDZV_PORT = 29500
REPLICATED_JOB = "node"  # pods are <run>-node-0-<completion index>
DNS_LABEL_MAX = 63
# Matches k8s/cluster/namespace.yaml: rendering without --namespace targets the
# namespace that holds the PVC and the Secret, not whatever kubectl points at.
DEFAULT_NAMESPACE = "titan-moe"
# <run>-tensorboard is the longest fixed-suffix name we derive (a Service name: DNS-1035 label).
_LONGEST_SUFFIX = "-tensorboard"

# Per-GPU defaults for a pod's CPU and memory (requests = limits: Guaranteed QoS).
# 8 cores and 64Gi per GPU fit every common 8-GPU node (p4d/p5, a2/a3, ND H100)
# after system reservations, and a 1-GPU a2-highgpu-1g.
CPU_PER_GPU = 8
MEMORY_PER_GPU_GI = 64

NETWORKS = ("tcp", "infiniband", "efa")
# Device-plugin resource and count a node pod requests for its RDMA NICs.
DEFAULT_RDMA_RESOURCE = {
    "infiniband": "rdma/rdma_shared_device_a=1",  # NVIDIA Network Operator, shared RDMA device plugin
    "efa": "vpc.amazonaws.com/efa=32",  # EFA device plugin; 32 on p5.48xlarge (p4d: 4, p5en: 16)
}
# NCCL / libfabric settings per network.  NCCL_NET names the transport so that NCCL
# fails at init instead of silently falling back to TCP sockets when RDMA is missing.
NETWORK_ENV = {
    "tcp": {},
    "infiniband": {"NCCL_NET": "IB", "NCCL_IB_DISABLE": "0", "NCCL_SOCKET_IFNAME": "eth0"},
    "efa": {
        "NCCL_NET": "AWS Libfabric",  # the aws-ofi-nccl plugin
        "FI_PROVIDER": "efa",
        "FI_EFA_USE_DEVICE_RDMA": "1",  # GPUDirect RDMA (p4d and later)
        "FI_EFA_FORK_SAFE": "1",  # data-loader workers fork after libfabric initialised
        "NCCL_SOCKET_IFNAME": "eth0",
    },
}

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Container image reference pieces (the OCI distribution grammar, simplified).
_IMAGE_COMPONENT = re.compile(r"^[a-z0-9]+([._-]+[a-z0-9]+)*$")
_IMAGE_HOST = re.compile(r"^[a-zA-Z0-9.-]+(:[0-9]+)?$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_IMAGE_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def quantity(text: str) -> float:
    """A Kubernetes quantity ("64Gi", "500m", "16") as a number (bytes, cores)."""
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def check_quantity(field: str, value: str | None) -> None:
    if value is not None and (not _QUANTITY.match(value) or quantity(value) <= 0):
        raise ConfigError(field, f"{value!r} is not a positive Kubernetes quantity (e.g. 64Gi, 500m, 16)")


def check_object_name(field: str, value: str) -> None:
    if not _OBJECT_NAME.match(value) or len(value) > 253:
        raise ConfigError(field, f"{value!r} is not a valid object name (lowercase letters, digits, '-', '.')")


@dataclass(frozen=True)
class Resource:
    """An extended resource a pod requests, as ``NAME=COUNT``."""

    name: str
    count: int

    @classmethod
    def parse(cls, text: str, field: str) -> Resource:
        name, eq, count = text.partition("=")
        if not eq or not _RESOURCE_NAME.match(name) or not count.isdigit() or int(count) < 1:
            raise ConfigError(field, f"{text!r} is not RESOURCE=COUNT, e.g. rdma/rdma_shared_device_a=1")
        return cls(name, int(count))


@dataclass(frozen=True)
class RenderOptions:
    """Everything about a cluster run that is not in the run config.

    Defaults suit a cluster prepared with ``k8s/cluster`` (see k8s/README.md).
    """

    name: str | None = None
    """JobSet/run name (DNS-1035 label); default: derived from the config file name."""
    namespace: str = DEFAULT_NAMESPACE
    """Namespace of every object; it must hold the claim and the Secret (k8s/cluster creates them)."""
    runs_claim: str = "titan-moe-runs"
    """ReadWriteMany PersistentVolumeClaim holding checkpoints and TensorBoard logs of all runs."""
    runs_mount: str = "/runs"
    """Where that claim is mounted; the run writes under ``<runs_mount>/<name>``."""
    s3_secret: str | None = "titan-moe-s3"
    """Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and (optional) AWS_SESSION_TOKEN,
    S3_ENDPOINT_URL, AWS_DEFAULT_REGION; None: no static keys (workload identity, see service_account)."""
    service_account: str | None = None
    """ServiceAccount of every pod (IRSA / EKS Pod Identity / GKE Workload Identity bind cloud
    roles to it); its API token is never mounted.  Default: the namespace's ``default``."""
    image_pull_secrets: tuple[str, ...] = ()
    """Secrets of type kubernetes.io/dockerconfigjson for a private registry."""
    network: str = "tcp"
    """Inter-node transport: tcp (pod network), infiniband (RDMA NICs), efa (AWS EFA)."""
    rdma_resource: str | None = None
    """``NAME=COUNT`` device-plugin resource for the RDMA NICs; default per network (DEFAULT_RDMA_RESOURCE)."""
    nccl_env: tuple[str, ...] = ()
    """Extra ``KEY=VALUE`` environment of the trainer (NCCL_*, FI_*, ...); overrides the network's defaults."""
    shm_size: str | None = None
    """Size of the memory-backed /dev/shm; default 4Gi per GPU (at least 8Gi)."""
    cpu: str | None = None
    """CPU of a node pod, request = limit; default CPU_PER_GPU per GPU."""
    memory: str | None = None
    """Memory of a node pod, request = limit; default MEMORY_PER_GPU_GI per GPU. /dev/shm counts against it."""
    data_cache_size: str = "100Gi"
    """sizeLimit of the node-local MDS shard cache; the trainer's data.cache_limit stays 10% below it."""
    checkpoint_seconds: int = 60
    """How long one checkpoint save takes at most: sizes the preemption grace period."""
    step_seconds: int = 30
    """How long one training step takes at most (the step in flight finishes before the save)."""
    max_restarts: int = 3
    """JobSet restarts for failures no pod explained (a container killed from outside, a setup error)."""
    crash_loop_limit: int = 3
    """Attempts in a row that may end without a new committed checkpoint; the next one ends the run."""
    join_timeout_s: int = 900
    """How long nodes wait for each other at the rendezvous (image pulls on fresh nodes are slow)."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource name of a GPU on the cluster."""
    eval_gpus: int = 1
    """GPUs of the eval Job (its ``--nproc``; 0 scores on CPU)."""
    eval_tasks: str = "paloma,hellaswag_rc_5shot,boolq_mc_5shot,arc_easy_rc_5shot,mmlu_stem_test"
    """``titan-moe eval --tasks`` of the eval Job."""
    eval_data: str | None = None
    """``--data-root`` of the eval Job, on the run volume; default ``<runs_mount>/eval-data``."""

    def check(self, nodes: int) -> None:
        """Raise ConfigError for an option no cluster would accept."""
        if self.name is not None:
            check_name(self.name, nodes, field="--name")
        if len(self.namespace) > DNS_LABEL_MAX or not _DNS1123.match(self.namespace):
            raise ConfigError("--namespace", f"{self.namespace!r} is not a namespace name (lowercase DNS label)")
        check_object_name("--pvc", self.runs_claim)
        if self.s3_secret is not None:
            check_object_name("--s3-secret", self.s3_secret)
        if self.service_account is not None:
            check_object_name("--service-account", self.service_account)
        for secret in self.image_pull_secrets:
            check_object_name("--image-pull-secret", secret)
        if not self.runs_mount.startswith("/") or self.runs_mount.rstrip("/") in ("", "/dev", "/proc", "/sys", "/tmp"):
            raise ConfigError("--runs-mount",
                              f"{self.runs_mount!r} must be an absolute path outside /dev, /proc, /sys, /tmp")
        if not self.eval_tasks.strip():
            raise ConfigError("--eval-tasks", "must name at least one task, e.g. paloma,boolq")
        if not self.eval_data_root.startswith(self.runs_mount.rstrip("/") + "/"):
            raise ConfigError(
                "--eval-data",
                f"{self.eval_data_root!r} must lie on the run volume (under {self.runs_mount}/), "
                "the only data volume the eval Job mounts",
            )
        if self.network not in NETWORKS:
            raise ConfigError("--network", f"{self.network!r} is not one of {', '.join(NETWORKS)}")
        if self.rdma_resource is not None:
            if self.network == "tcp":
                raise ConfigError("--rdma-resource", "needs --network infiniband or efa")
            Resource.parse(self.rdma_resource, "--rdma-resource")
        for item in self.nccl_env:
            key, eq, _ = item.partition("=")
            if not eq or not _ENV_NAME.match(key):
                raise ConfigError("--nccl-env", f"{item!r} is not KEY=VALUE, e.g. NCCL_DEBUG=INFO")
        for field, value in (("--shm-size", self.shm_size), ("--cpu", self.cpu), ("--memory", self.memory),
                             ("--data-cache-size", self.data_cache_size)):
            check_quantity(field, value)
        for field, value, low in (
            ("--checkpoint-seconds", self.checkpoint_seconds, 1),
            ("--step-seconds", self.step_seconds, 1),
            ("--max-restarts", self.max_restarts, 0),
            ("--crash-loop-limit", self.crash_loop_limit, 1),
            ("--join-timeout", self.join_timeout_s, 1),
            ("--eval-gpus", self.eval_gpus, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(field, f"must be an integer >= {low}, got {value!r}")

    def check_shape(self, gpus_per_node: int) -> None:
        """Checks that need the pod's GPU count: /dev/shm must fit in the pod's memory."""
        memory, shm = self.memory_for(gpus_per_node), self.shm_for(gpus_per_node)
        if quantity(shm) >= quantity(memory):
            raise ConfigError(
                "--memory" if self.memory else "--shm-size",
                f"/dev/shm ({shm}) is memory-backed and counts against the pod's memory ({memory}); "
                f"raise --memory or lower --shm-size",
            )

    @property
    def eval_data_root(self) -> str:
        return self.eval_data or f"{self.runs_mount.rstrip('/')}/eval-data"

    @property
    def trainer_grace_s(self) -> int:
        """``checkpoint.preemption_grace_seconds`` of the trainer: two steps, then one save.

        The ranks agree on a stop with an all-reduce started at one step boundary and
        read at the next (titan_moe.checkpoint.preemption), so after SIGTERM the step
        in flight and one more step run before the save.  The trainer saves when more
        than SAVE_FACTOR x save + SAVE_SLACK_S seconds are left then: two steps of
        ``step_seconds`` followed by a save of ``checkpoint_seconds`` fit with one
        second to spare.
        """
        return 2 * self.step_seconds + math.ceil(SAVE_FACTOR * self.checkpoint_seconds + SAVE_SLACK_S) + 1

    @property
    def grace_period_s(self) -> int:
        """terminationGracePeriodSeconds of a node pod: the trainer's budget plus teardown.

        The entrypoint hands SIGTERM straight to the workers, so their clock and the
        kubelet's start together; nothing else shortens the window.
        """
        return self.trainer_grace_s + TEARDOWN_MARGIN_S

    @property
    def data_cache_limit(self) -> str:
        """``data.cache_limit`` for the trainer, in the units titan_moe.common.units.parse_bytes reads."""
        return f"{int(quantity(self.data_cache_size) * CACHE_LIMIT_FRACTION) // 2**20}mb"

    @property
    def rdma(self) -> Resource | None:
        if self.network == "tcp":
            return None
        return Resource.parse(self.rdma_resource or DEFAULT_RDMA_RESOURCE[self.network], "--rdma-resource")

    @property
    def trainer_env(self) -> dict[str, str]:
        """The network's NCCL/libfabric settings, then the user's extra ones on top."""
        env = dict(NETWORK_ENV[self.network])
        env.update(item.split("=", 1) for item in self.nccl_env)
        return env

    def shm_for(self, gpus_per_node: int) -> str:
        # Each rank's DataLoader workers hand batches over in shared memory and
        # mosaicml-streaming keeps its shard/sample state there; 4Gi per rank
        # is generous for token batches and still small next to a GPU node's RAM.
        return self.shm_size or f"{max(8, 4 * gpus_per_node)}Gi"

    def cpu_for(self, gpus: int) -> str:
        return self.cpu or str(CPU_PER_GPU * max(1, gpus))

    def memory_for(self, gpus: int) -> str:
        return self.memory or f"{MEMORY_PER_GPU_GI * max(1, gpus)}Gi"


def check_dns1035(name: str, field: str) -> None:
    if not _DNS1035.match(name):
        raise ConfigError(
            field,
            f"{name!r} is not a DNS-1035 label: lowercase letters, digits and '-', starting with a letter",
        )


def check_name(name: str, nodes: int, field: str) -> None:
    limit = max_name_length(nodes)
    check_dns1035(name, field)
    if len(name) > limit:
        raise ConfigError(
            field,
            f"{name!r} is {len(name)} characters; with {nodes} nodes the pod hostname "
            f"'{name}-{REPLICATED_JOB}-0-{nodes - 1}' and Service '{name}{_LONGEST_SUFFIX}' must fit "
            f"{DNS_LABEL_MAX}, so use at most {limit}",
        )


def max_name_length(nodes: int) -> int:
    hostname_suffix = len(f"-{REPLICATED_JOB}-0-{max(nodes - 1, 0)}")
    return DNS_LABEL_MAX - max(hostname_suffix, len(_LONGEST_SUFFIX))


def name_from_stem(stem: str, nodes: int) -> str:
    """A valid run name from a config file name: sanitised, shortened with a hash if needed.

    Sweeps render many configs with long, similar names; the hash keeps the
    shortened names distinct and stable across renders.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = f"run-{name}".rstrip("-")
    limit = max_name_length(nodes)
    if len(name) > limit:
        digest = hashlib.sha256(stem.encode()).hexdigest()[:6]
        name = f"{name[: limit - 7].rstrip('-')}-{digest}"
    return name


def check_image(image: str | None) -> str:
    if image is None or not str(image).strip():
        raise ConfigError(
            "--image",
            "no container image given; build k8s/Dockerfile, push it, and pass "
            "--image REGISTRY/titan-moe:TAG (a digest @sha256:... pins it exactly)",
        )
    if not _valid_image(image):
        raise ConfigError(
            "--image",
            f"{image!r} is not a container image reference like registry.example.com/team/titan-moe:0.1.0 "
            "(lowercase repository path, optional :tag and @sha256:digest, no spaces or scheme)",
        )
    return image


def check_queue(queue: str | None) -> None:
    if queue is not None and (len(queue) > DNS_LABEL_MAX or not _DNS1123.match(queue)):
        raise ConfigError("--queue", f"{queue!r} is not a Kueue LocalQueue name (lowercase DNS label)")


def check_shape(nodes: object, gpus_per_node: object) -> tuple[int, int]:
    for field, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(field, f"must be a positive integer, got {value!r}")
    return nodes, gpus_per_node  # type: ignore[return-value]


def _valid_image(image: str) -> bool:
    ref, at, digest = image.partition("@")
    if at and not _IMAGE_DIGEST.match(digest):
        return False
    repo, tag = ref, None
    if ":" in ref.rsplit("/", 1)[-1]:
        repo, tag = ref.rsplit(":", 1)
    if tag is not None and not _IMAGE_TAG.match(tag):
        return False
    parts = repo.split("/")
    # The first part is a registry host when it looks like one (has '.' or ':' or is localhost).
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        if not _IMAGE_HOST.match(parts[0]):
            return False
        parts = parts[1:]
    return bool(parts) and all(_IMAGE_COMPONENT.match(p) for p in parts)

"""Knobs of ``titan-moe k8s render`` and the checks that run before any YAML is written."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from titan_moe.errors import ConfigError

# torch.distributed.elastic: on SIGTERM torchrun forwards the signal to its
# workers and SIGKILLs them after PContext.close(timeout=30) -- a fixed 30 s,
# no flag or env var changes it in torch 2.11.
TORCHRUN_SHUTDOWN_TIMEOUT_S = 30
# After its workers are gone torchrun still closes the rendezvous and exits;
# a few seconds normally, the margin keeps the kubelet's SIGKILL off it.
TEARDOWN_MARGIN_S = 30

RDZV_PORT = 29500
REPLICATED_JOB = "node"  # pods are <run>-node-0-<completion index>
DNS_LABEL_MAX = 63
# <run>-tensorboard is the longest fixed-suffix name we derive (a Service name: DNS-1035 label).
_LONGEST_SUFFIX = "-tensorboard"

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
# Container image reference pieces (the OCI distribution grammar, simplified).
_IMAGE_COMPONENT = re.compile(r"^[a-z0-9]+([._-]+[a-z0-9]+)*$")
_IMAGE_HOST = re.compile(r"^[a-zA-Z0-9.-]+(:[0-9]+)?$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_IMAGE_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class RenderOptions:
    """Everything about a cluster run that is not in the run config.

    Defaults suit a cluster prepared with ``k8s/cluster`` (see k8s/README.md).
    """

    name: str | None = None
    """JobSet/run name (DNS-1035 label); default: derived from the config file name."""
    namespace: str | None = None
    """Namespace for every object; default: whatever ``kubectl`` targets."""
    runs_claim: str = "titan-moe-runs"
    """ReadWriteMany PersistentVolumeClaim holding checkpoints and TensorBoard logs of all runs."""
    runs_mount: str = "/runs"
    """Where that claim is mounted; the run writes under ``<runs_mount>/<name>``."""
    s3_secret: str = "titan-moe-s3"
    """Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and (optional) S3_ENDPOINT_URL / AWS_DEFAULT_REGION."""
    shm_size: str | None = None
    """Size of the memory-backed /dev/shm; default 4Gi per GPU (at least 8Gi)."""
    checkpoint_seconds: int = 60
    """Time budget for one checkpoint save; part of the pod's termination grace period."""
    max_restarts: int = 3
    """JobSet restarts allowed for real crashes (preemptions do not count)."""
    torchrun_restarts: int = 3
    """torchrun in-pod worker restarts (cheap recovery from a transient worker failure)."""
    join_timeout_s: int = 900
    """How long torchrun waits for all nodes to rendezvous (image pulls on fresh nodes are slow)."""
    cpu: str | None = None
    """CPU request per node pod (e.g. "90"); default: none."""
    memory: str | None = None
    """Memory request per node pod (e.g. "1500Gi"); default: none. /dev/shm counts against it."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource name of a GPU on the cluster."""
    eval_gpus: int = 1
    """GPUs of the eval Job (its ``--nproc``; 0 scores on CPU)."""
    eval_tasks: str = "paloma,boolq,hellaswag,mmlu"
    """``titan-moe eval --tasks`` of the eval Job."""
    eval_data: str | None = None
    """``--data-root`` of the eval Job, on the run volume; default ``<runs_mount>/eval-data``."""

    def check(self, nodes: int) -> None:
        """Raise ConfigError for an option no cluster would accept."""
        if self.name is not None:
            check_name(self.name, nodes, field="--name")
        if self.namespace is not None and (len(self.namespace) > DNS_LABEL_MAX or not _DNS1123.match(self.namespace)):
            raise ConfigError("--namespace", f"{self.namespace!r} is not a namespace name (lowercase DNS label)")
        for field, value in (("--pvc", self.runs_claim), ("--s3-secret", self.s3_secret)):
            if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", value) or len(value) > 253:
                raise ConfigError(field, f"{value!r} is not a valid object name (lowercase letters, digits, '-', '.')")
        if not self.runs_mount.startswith("/") or self.runs_mount.rstrip("/") in ("", "/dev", "/proc", "/sys"):
            raise ConfigError("--runs-mount", f"{self.runs_mount!r} must be an absolute path outside /dev, /proc, /sys")
        if not self.eval_tasks.strip():
            raise ConfigError("--eval-tasks", "must name at least one task, e.g. paloma,boolq")
        if not self.eval_data_root.startswith(self.runs_mount.rstrip("/") + "/"):
            raise ConfigError(
                "--eval-data",
                f"{self.eval_data_root!r} must lie on the run volume (under {self.runs_mount}/), "
                "the only data volume the eval Job mounts",
            )
        for field, value in (("--shm-size", self.shm_size), ("--cpu", self.cpu), ("--memory", self.memory)):
            if value is not None and not _QUANTITY.match(value):
                raise ConfigError(field, f"{value!r} is not a Kubernetes quantity (e.g. 64Gi, 500m, 16)")
        for field, value, low in (
            ("--checkpoint-seconds", self.checkpoint_seconds, 1),
            ("--max-restarts", self.max_restarts, 0),
            ("--torchrun-restarts", self.torchrun_restarts, 0),
            ("--join-timeout", self.join_timeout_s, 1),
            ("--eval-gpus", self.eval_gpus, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(field, f"must be an integer >= {low}, got {value!r}")

    @property
    def eval_data_root(self) -> str:
        return self.eval_data or f"{self.runs_mount.rstrip('/')}/eval-data"

    @property
    def grace_period_s(self) -> int:
        """terminationGracePeriodSeconds of a node pod.

        torchrun's fixed 30 s worker-shutdown window, plus one checkpoint save,
        plus teardown margin: the kubelet's SIGKILL must never land before
        torchrun has finished its own orderly shutdown of a saving worker.
        """
        return TORCHRUN_SHUTDOWN_TIMEOUT_S + self.checkpoint_seconds + TEARDOWN_MARGIN_S

    def shm_for(self, gpus_per_node: int) -> str:
        # Each rank's DataLoader workers hand batches over in shared memory and
        # mosaicml-streaming keeps its shard/sample state there; 4Gi per rank
        # is generous for token batches and still small next to a GPU node's RAM.
        return self.shm_size or f"{max(8, 4 * gpus_per_node)}Gi"


def check_name(name: str, nodes: int, field: str) -> None:
    limit = max_name_length(nodes)
    if not _DNS1035.match(name):
        raise ConfigError(
            field,
            f"{name!r} is not a DNS-1035 label: lowercase letters, digits and '-', starting with a letter",
        )
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

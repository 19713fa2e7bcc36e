"""`titan-moe prep` scaled out on Kubernetes: an Indexed Job of shard workers plus a finalize Job.

Each pod of the Indexed Job runs the same ``titan-moe prep INPUT OUTPUT ...``
command; the prep command takes its share of the input files from
``JOB_COMPLETION_INDEX`` (set by the Job controller on every pod of an Indexed
Job) and ``JOB_COMPLETIONS`` (set here, the Job's ``completions``).  When all
shards are complete, the finalize Job runs the same command with ``--finalize``
(streams, indexes, manifest).  Storage, credentials, security and resources
follow the training manifests (``jobs/k8s/podspec.py``): the run volume is
mounted at ``--runs-mount``, so INPUT/OUTPUT may be s3:// URLs or paths on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.k8s import podspec
from jobs.k8s.options import (
    DNS_LABEL_MAX,
    RenderOptions,
    check_dns1035,
    check_image,
    check_quantity,
    check_queue,
    quantity,
)
from titan_moe.common.errors import ConfigError

SHARDS_FILE = "prep-shards-job.yaml"
FINALIZE_FILE = "prep-finalize-job.yaml"
COMPLETIONS_ENV = "JOB_COMPLETIONS"
# "<name>-shards-<index>" is a pod hostname of the Indexed Job: it must fit a DNS label.
_SHARDS_SUFFIX = "-shards"


@dataclass(frozen=True)
class PrepSpec:
    """One scaled-out ``titan-moe prep`` run (the prep flags are the prep command's own)."""

    input_root: str
    output: str
    shards: int
    name: str = "prep"
    tokenizer: str | None = None
    seq_len: int | None = None
    sources: str | None = None
    workers: int | None = None
    """Tokenizer processes per pod; default: the pod's CPU count (not the node's)."""
    work_dir: str | None = None
    parallelism: int | None = None
    """Pods running at once; default: all shards."""
    retries_per_shard: int = 2
    """backoffLimitPerIndex: a failed shard is retried alone, this many times."""
    cpu: str = "8"
    memory: str = "32Gi"

    def check(self) -> None:
        for name, value in (("--shards", self.shards), ("--parallelism", self.parallelism),
                            ("--workers", self.workers), ("--seq-len", self.seq_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if isinstance(self.retries_per_shard, bool) or not isinstance(self.retries_per_shard, int) \
                or self.retries_per_shard < 0:
            raise ConfigError("--retries-per-shard", f"must be an integer >= 0, got {self.retries_per_shard!r}")
        for name, value in (("INPUT_ROOT", self.input_root), ("OUTPUT_URL", self.output)):
            if not value or not value.strip():
                raise ConfigError(name, "must be an s3:// URL or a path on the run volume")
        check_quantity("--cpu", self.cpu)
        check_quantity("--memory", self.memory)
        check_dns1035(self.name, "--name")
        limit = DNS_LABEL_MAX - len(f"{_SHARDS_SUFFIX}-{self.shards - 1}")
        if len(self.name) > limit:
            raise ConfigError("--name", f"{self.name!r} is too long: with {self.shards} shards use at most {limit}")

    @property
    def pod_workers(self) -> int:
        # os.cpu_count() in a container is the node's count, not the pod's CPU limit.
        return self.workers or max(1, int(quantity(self.cpu)))

    def command(self) -> list[str]:
        """``titan-moe prep INPUT OUTPUT [options]``, as data_prep/cli.py documents it."""
        cmd = ["titan-moe", "prep", self.input_root, self.output]
        for flag, value in (("--tokenizer", self.tokenizer), ("--seq-len", self.seq_len),
                            ("--sources", self.sources), ("--workers", self.pod_workers),
                            ("--work-dir", self.work_dir)):
            if value is not None:
                cmd += [flag, str(value)]
        return [*cmd, "--no-progress"]  # a log, not a terminal


def _labels(spec: PrepSpec, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "titan-moe",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
    }


def _pod_template(spec: PrepSpec, image: str, options: RenderOptions, command: list[str], component: str,
                  extra_env: list[dict]) -> dict:
    tmp, tmp_mount = podspec.tmp_volume()
    container = podspec.container(
        "prep",
        image,
        command,
        env=[*podspec.base_env(), *extra_env, *podspec.credentials_env(options)],
        resources=podspec.guaranteed(spec.cpu, spec.memory),
        mounts=[{"name": "runs", "mountPath": options.runs_mount}, tmp_mount],
    )
    volumes = [{"name": "runs", "persistentVolumeClaim": {"claimName": options.runs_claim}}, tmp]
    return {
        "metadata": {"labels": _labels(spec, component)},
        "spec": podspec.pod_spec(options, [container], volumes, gpus=False),
    }


def _metadata(spec: PrepSpec, name: str, component: str, options: RenderOptions, queue: str | None) -> dict:
    labels = _labels(spec, component)
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = queue
    return {"name": name, "namespace": options.namespace, "labels": labels}


# A shard lost to preemption, eviction or a drained node is retried without
# using up its backoffLimitPerIndex (the work it lost is redone from its inputs).
_IGNORE_DISRUPTIONS = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def shards_job(spec: PrepSpec, image: str, options: RenderOptions, queue: str | None = None) -> dict:
    completions_env = [{"name": COMPLETIONS_ENV, "value": str(spec.shards)}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, f"{spec.name}{_SHARDS_SUFFIX}", "prep-shards", options, queue),
        "spec": {
            "completionMode": "Indexed",  # JOB_COMPLETION_INDEX = shard
            "completions": spec.shards,
            "parallelism": min(spec.parallelism or spec.shards, spec.shards),
            "backoffLimitPerIndex": spec.retries_per_shard,
            # One shard out of retries fails the Job at once: the output would be incomplete.
            "maxFailedIndexes": 0,
            "podFailurePolicy": {"rules": [_IGNORE_DISRUPTIONS]},
            "template": _pod_template(spec, image, options, spec.command(), "prep-shards", completions_env),
        },
    }


def finalize_job(spec: PrepSpec, image: str, options: RenderOptions, queue: str | None = None) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, f"{spec.name}-finalize", "prep-finalize", options, queue),
        "spec": {
            "backoffLimit": spec.retries_per_shard,
            "podFailurePolicy": {"rules": [_IGNORE_DISRUPTIONS]},
            "template": _pod_template(spec, image, options, [*spec.command(), "--finalize"], "prep-finalize", []),
        },
    }


def build(spec: PrepSpec, image: str | None, options: RenderOptions, queue: str | None = None) -> dict[str, dict]:
    """File name -> object; ConfigError before anything is built for a bad input."""
    spec.check()
    image = check_image(image)
    options.check(nodes=1)
    check_queue(queue)
    return {
        SHARDS_FILE: shards_job(spec, image, options, queue),
        FINALIZE_FILE: finalize_job(spec, image, options, queue),
    }

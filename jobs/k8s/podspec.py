"""Pod-spec pieces every titan-moe pod shares: security, resources, credentials, scratch space.

One place for the conventions, so the trainer JobSet, TensorBoard, the eval Job
and the prep Jobs cannot drift apart:

* **Security** -- every pod passes the Kubernetes "restricted" Pod Security
  profile: non-root (the image's USER, uid 10001), no privilege escalation, all
  capabilities dropped, the RuntimeDefault seccomp profile, a read-only root
  filesystem with an emptyDir at /tmp, and no ServiceAccount token mounted (no
  pod talks to the API server).  The one exception is opt-in: RDMA networks add
  ``IPC_LOCK`` to the trainer (``RDMA_CAPABILITIES``), which "restricted" and even
  "baseline" forbid -- such runs need a namespace that enforces "privileged".
* **Resources** -- requests equal limits for CPU and memory in every container:
  Guaranteed QoS, the last class the kubelet evicts under node pressure.
* **Credentials** -- object-store keys come from a Secret as optional
  environment variables beside AWS_SESSION_TOKEN, or not at all: with
  ``--s3-secret none`` and a ServiceAccount bound to a cloud role (IRSA, EKS Pod
  Identity), botocore's default chain finds the web-identity token.
"""

from __future__ import annotations

from jobs.k8s.options import RenderOptions, quantity

# The image's USER (k8s/Dockerfile); fsGroup makes the volumes writable for it.
RUN_AS_UID = 10001  # >= 10000: clear of host system users (checkov CKV_K8S_40)
TMP_MOUNT = "/tmp"
TMP_SIZE = "16Gi"  # torch/triton compile caches, matplotlib config, HOME
RDMA_CAPABILITIES = ("IPC_LOCK",)  # pinning (registering) memory for the RDMA NICs

REQUIRED_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# AWS needs no endpoint and has a default region; a session token only with temporary keys.
OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN", "S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_UID,
        "runAsGroup": RUN_AS_UID,
        "fsGroup": RUN_AS_UID,
        # Re-owning a multi-terabyte run volume at every pod start would take minutes.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(add_capabilities: tuple[str, ...] = ()) -> dict:
    capabilities: dict = {"drop": ["ALL"]}
    if add_capabilities:
        capabilities["add"] = list(add_capabilities)
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": capabilities,
    }


def guaranteed(cpu: str, memory: str, extended: dict[str, str] | None = None,
               ephemeral_storage: str | None = None) -> dict:
    """requests == limits for CPU, memory and extended resources (Guaranteed QoS)."""
    limits = {"cpu": cpu, "memory": memory, **(extended or {})}
    requests = dict(limits)
    if ephemeral_storage:
        # Scheduling only: land on a node whose disk holds the emptyDirs; the
        # emptyDir sizeLimits are what bounds their use.
        requests["ephemeral-storage"] = ephemeral_storage
    return {"requests": requests, "limits": limits}


def gibibytes(*sizes: str) -> str:
    """The sum of some quantities, rounded up to whole Gi."""
    total = sum(quantity(s) for s in sizes)
    return f"{-(-int(total) // 2**30)}Gi"


def credentials_env(options: RenderOptions) -> list[dict]:
    """Object-store credentials from the Secret (never literals), or none for workload identity."""
    if options.s3_secret is None:
        return []
    env = []
    for key in REQUIRED_SECRET_KEYS + OPTIONAL_SECRET_KEYS:
        ref = {"name": options.s3_secret, "key": key}
        if key in OPTIONAL_SECRET_KEYS:
            ref["optional"] = True
        env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def base_env() -> list[dict]:
    return [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The root filesystem is read-only: caches and config dirs go to the /tmp emptyDir.
        {"name": "HOME", "value": TMP_MOUNT},
    ]


def tmp_volume() -> tuple[dict, dict]:
    """The writable /tmp (volume, mount) that a read-only root filesystem needs."""
    return ({"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}}, {"name": "tmp", "mountPath": TMP_MOUNT})


def container(
    name: str,
    image: str,
    command: list[str],
    *,
    args: list[str] | None = None,
    env: list[dict],
    resources: dict,
    mounts: list[dict],
    ports: list[dict] | None = None,
    add_capabilities: tuple[str, ...] = (),
) -> dict:
    out: dict = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "command": command}
    if args is not None:
        out["args"] = args
    out["env"] = env
    if ports:
        out["ports"] = ports
    out["resources"] = resources
    out["securityContext"] = container_security_context(add_capabilities)
    out["volumeMounts"] = mounts
    return out


def pod_spec(
    options: RenderOptions,
    containers: list[dict],
    volumes: list[dict],
    *,
    gpus: bool,
    restart_policy: str = "Never",
    grace_period_s: int | None = None,
) -> dict:
    spec: dict = {"restartPolicy": restart_policy}
    if grace_period_s is not None:
        spec["terminationGracePeriodSeconds"] = grace_period_s
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    spec["automountServiceAccountToken"] = False
    spec["enableServiceLinks"] = False  # no Service env vars: they would shadow nothing we need
    if options.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in options.image_pull_secrets]
    spec["securityContext"] = pod_security_context()
    if gpus:
        spec["tolerations"] = [{"key": options.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    spec["containers"] = containers
    spec["volumes"] = volumes
    return spec

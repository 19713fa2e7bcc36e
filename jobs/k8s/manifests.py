"""The Kubernetes objects of one titan-moe run, as plain dicts.

Plain data structures, no templating: each function builds one object from a
``Run`` (the run config plus the cluster shape and options) and the tests
validate the result against the Kubernetes and JobSet schemas.

Failure model (the pattern the JobSet project documents for preemption):

* one ReplicatedJob ``node`` with one Indexed Job of N pods (one per node,
  G GPUs each), ``restartPolicy: Never`` and ``backoffLimit: 0``: any pod
  failure fails the Job, and with it the JobSet;
* the Job's ``podFailurePolicy`` fails it with reason ``PodFailurePolicy``
  when the failed pod carries the ``DisruptionTarget`` condition (preemption,
  node drain, node loss, eviction), so it is told apart from a crash
  (reason ``BackoffLimitExceeded``);
* the JobSet's ``failurePolicy`` restarts the whole group on either; a rule
  makes preemption restarts free (``RestartJobSetAndIgnoreMaxRestarts``)
  while crashes count against ``maxRestarts``; ``BlockingRecreate`` deletes
  every old pod before any new one starts, so two generations never meet at
  the rendezvous;
* every new generation starts torchrun from scratch and the trainer resumes
  from the latest checkpoint in ``<runs>/<run>/<checkpoint folder>``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from jobs.k8s.options import RDZV_PORT, REPLICATED_JOB, RenderOptions
from jobs.k8s.runconfig import ClusterRunConfig

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
CONFIG_MOUNT = "/config"
CONFIG_KEY = "run.toml"
# Node-local cache of downloaded MDS shards: one per pod (streaming keeps one
# cache per node; the shared run volume would have every node fight over one).
DATA_CACHE_MOUNT = "/data-cache"
TENSORBOARD_PORT = 6006
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_HASH_ANNOTATION = "titan-moe/config-sha256"
# The trainer entry point; torchrun runs it as a module in every worker.
TRAIN_MODULE = "titan_moe.train"

# Object-store credentials: read from the Secret, never baked into the image.
REQUIRED_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_KEYS = ("S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Run:
    """A run config placed on a cluster: what every manifest is built from."""

    name: str
    config: ClusterRunConfig
    nodes: int
    gpus_per_node: int
    image: str
    queue: str | None
    options: RenderOptions

    @property
    def run_dir(self) -> str:
        """The run's folder on the shared volume: torchtitan's job.dump_folder."""
        return f"{self.options.runs_mount.rstrip('/')}/{self.name}"

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.run_dir}/{self.config.checkpoint_folder}"

    @property
    def tensorboard_dir(self) -> str:
        return f"{self.run_dir}/{self.config.tb_folder}"

    @property
    def leader_host(self) -> str:
        """DNS name of the completion-index-0 pod through the JobSet's headless Service.

        JobSet names pods ``<jobset>-<replicatedJob>-<job index>-<completion index>``
        and, with enableDNSHostnames, publishes them under the subdomain (the
        headless Service it creates, named after the JobSet by default).
        """
        return f"{self.name}-{REPLICATED_JOB}-0-0.{self.name}"

    @property
    def rendezvous_endpoint(self) -> str:
        return f"{self.leader_host}:{RDZV_PORT}"


def _labels(run: Run, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "titan-moe",
        "app.kubernetes.io/instance": run.name,
        "app.kubernetes.io/component": component,
    }


def _metadata(run: Run, name: str, component: str, queue: bool = False) -> dict:
    labels = _labels(run, component)
    if queue and run.queue:
        # Kueue admits (and preempts) the whole JobSet as one workload.
        labels[KUEUE_QUEUE_LABEL] = run.queue
    meta: dict = {"name": name, "labels": labels}
    if run.options.namespace:
        meta["namespace"] = run.options.namespace
    return meta


def _secret_env(run: Run) -> list[dict]:
    env = []
    for key in REQUIRED_SECRET_KEYS + OPTIONAL_SECRET_KEYS:
        ref = {"name": run.options.s3_secret, "key": key}
        if key in OPTIONAL_SECRET_KEYS:
            ref["optional"] = True  # AWS itself needs no endpoint; region has a default
        env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def trainer_script(run: Run) -> str:
    """The node pod's shell command: exec torchrun with this pod's node rank.

    ``exec`` makes torchrun PID 1 of the container, so the kubelet's SIGTERM
    reaches it directly and torchrun forwards it to the workers at once (a
    trainer that handles SIGTERM can save a last checkpoint within torchrun's
    30 s).  ``JOB_COMPLETION_INDEX`` is set by the Job controller on every pod
    of an Indexed Job.
    """
    o = run.options
    torchrun = [
        "torchrun",
        f"--nnodes={run.nodes}",
        f"--nproc_per_node={run.gpus_per_node}",
        '--node_rank="${JOB_COMPLETION_INDEX}"',
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={run.rendezvous_endpoint}",
        f"--rdzv_id={run.name}",
        f"--rdzv_conf=join_timeout={o.join_timeout_s}",
        f"--max_restarts={o.torchrun_restarts}",
    ]
    trainer = [
        ["-m", TRAIN_MODULE],
        ["--job.config_file", f"{CONFIG_MOUNT}/{CONFIG_KEY}"],
        # The render's own overrides; the cluster settings below come later and win.
        *([word] for word in run.config.overrides),
        # Everything the run writes goes to the shared volume, under its own folder.
        ["--job.dump_folder", run.run_dir],
        # Auto-resume after a restart needs checkpoints, whatever the TOML says.
        ["--checkpoint.enable"],
        ["--checkpoint.folder", run.config.checkpoint_folder],
        ["--metrics.enable_tensorboard"],
        ["--metrics.save_tb_folder", run.config.tb_folder],
        ["--data.local_cache", DATA_CACHE_MOUNT],
    ]
    # Quote the fixed words; the node-rank word keeps its "${...}" for the shell.
    lines = [w if w.startswith("--node_rank=") else shlex.quote(w) for w in torchrun]
    lines += [" ".join(shlex.quote(w) for w in pair) for pair in trainer]
    return "exec " + " \\\n  ".join(lines) + "\n"


def configmap(run: Run) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, f"{run.name}-config", "config"),
        "data": {CONFIG_KEY: run.config.text},
    }


def _trainer_pod_spec(run: Run) -> dict:
    o = run.options
    gpus = {o.gpu_resource: str(run.gpus_per_node)}
    requests = dict(gpus)
    if o.cpu:
        requests["cpu"] = o.cpu
    if o.memory:
        requests["memory"] = o.memory
    env = [
        # torch 2.11: with the agent's rendezvous TCPStore shared with the workers,
        # torchrun's in-pod restarts (--max_restarts) fail to re-create the store.
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TITAN_MOE_RUN", "value": run.name},
        *_secret_env(run),
    ]
    return {
        "restartPolicy": "Never",  # required by podFailurePolicy; restarts are the JobSet's
        "terminationGracePeriodSeconds": o.grace_period_s,
        "tolerations": [{"key": o.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [
            {
                "name": "trainer",
                "image": run.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/bash", "-c"],
                "args": [trainer_script(run)],
                "env": env,
                "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}],
                "resources": {"requests": requests, "limits": dict(gpus)},
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                    {"name": "shm", "mountPath": "/dev/shm"},
                    {"name": "runs", "mountPath": o.runs_mount},
                    {"name": "data-cache", "mountPath": DATA_CACHE_MOUNT},
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{run.name}-config"}},
            # Docker's default 64Mi /dev/shm starves DataLoader workers; memory-backed, sized.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": o.shm_for(run.gpus_per_node)}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_claim}},
            {"name": "data-cache", "emptyDir": {}},
        ],
    }


def jobset(run: Run) -> dict:
    o = run.options
    pod_meta = {
        "labels": _labels(run, "trainer"),
        # A changed config shows up as a changed pod template.
        "annotations": {CONFIG_HASH_ANNOTATION: run.config.sha256},
    }
    job_spec = {
        "parallelism": run.nodes,
        "completions": run.nodes,
        "completionMode": "Indexed",  # completion index = node rank
        "backoffLimit": 0,  # one failed pod fails the Job: the JobSet restarts the group
        "podFailurePolicy": {
            "rules": [
                {
                    # Preempted / evicted / node lost: fail with reason PodFailurePolicy,
                    # which the JobSet rule below restarts without using up maxRestarts.
                    "action": "FailJob",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                }
            ]
        },
        "template": {"metadata": pod_meta, "spec": _trainer_pod_spec(run)},
    }
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": {
            **_metadata(run, run.name, "trainer", queue=True),
            "annotations": {CONFIG_HASH_ANNOTATION: run.config.sha256},
        },
        "spec": {
            "network": {
                "enableDNSHostnames": True,
                # The leader must be resolvable before every pod is Ready: rendezvous
                # happens while pods are still starting.
                "publishNotReadyAddresses": True,
                "subdomain": run.name,
            },
            "failurePolicy": {
                "maxRestarts": o.max_restarts,
                "restartStrategy": "BlockingRecreate",
                "rules": [
                    {
                        "name": "RestartOnPreemption",
                        "action": "RestartJobSetAndIgnoreMaxRestarts",
                        "onJobFailureReasons": ["PodFailurePolicy"],
                    }
                ],
            },
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": 1,
                    "template": {"metadata": {"labels": _labels(run, "trainer")}, "spec": job_spec},
                }
            ],
        },
    }


def _tensorboard_selector(run: Run) -> dict[str, str]:
    return {"app.kubernetes.io/instance": run.name, "app.kubernetes.io/component": "tensorboard"}


def tensorboard_deployment(run: Run) -> dict:
    o = run.options
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(run, f"{run.name}-tensorboard", "tensorboard"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _tensorboard_selector(run)},
            "template": {
                "metadata": {"labels": _labels(run, "tensorboard")},
                "spec": {
                    "containers": [
                        {
                            "name": "tensorboard",
                            "image": run.image,  # the training image has tensorboard
                            "imagePullPolicy": "IfNotPresent",
                            "command": [
                                "tensorboard",
                                f"--logdir={run.tensorboard_dir}",
                                "--bind_all",
                                f"--port={TENSORBOARD_PORT}",
                                "--reload_interval=30",
                            ],
                            "ports": [{"name": "http", "containerPort": TENSORBOARD_PORT, "protocol": "TCP"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/", "port": "http"},
                                "periodSeconds": 10,
                            },
                            "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
                            "volumeMounts": [{"name": "runs", "mountPath": o.runs_mount, "readOnly": True}],
                        }
                    ],
                    "volumes": [
                        {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_claim, "readOnly": True}}
                    ],
                },
            },
        },
    }


def tensorboard_service(run: Run) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, f"{run.name}-tensorboard", "tensorboard"),
        "spec": {
            "type": "ClusterIP",
            "selector": _tensorboard_selector(run),
            "ports": [{"name": "http", "port": TENSORBOARD_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def eval_command(run: Run) -> list[str]:
    """Score the run's newest checkpoint (``titan-moe eval``, see eval/cli.py).

    Results land next to the checkpoints; the scalars go to the run's
    TensorBoard (``<tb>/eval``) at the checkpoint's step.
    """
    o = run.options
    return [
        "titan-moe", "eval",
        "--config", f"{CONFIG_MOUNT}/{CONFIG_KEY}",
        "--checkpoint", run.checkpoint_dir,  # a checkpoint folder: eval takes its newest step
        "--tasks", o.eval_tasks,
        "--data-root", o.eval_data_root,
        "--out", f"{run.run_dir}/eval/results.json",
        "--tb-dir", f"{run.tensorboard_dir}/eval",
        "--nproc", str(max(1, o.eval_gpus)),
        "--no-progress",  # a log file, not a terminal
        *(["--", *run.config.overrides] if run.config.overrides else []),
    ]  # fmt: skip


def eval_job(run: Run) -> dict:
    o = run.options
    resources: dict = {}
    if o.eval_gpus:
        gpus = {o.gpu_resource: str(o.eval_gpus)}
        resources = {"requests": dict(gpus), "limits": dict(gpus)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(run, f"{run.name}-eval", "eval", queue=True),
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": _labels(run, "eval")},
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [{"key": o.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "eval",
                            "image": run.image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": eval_command(run),
                            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *_secret_env(run)],
                            "resources": resources,
                            "volumeMounts": [
                                {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                                {"name": "runs", "mountPath": o.runs_mount},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": f"{run.name}-config"}},
                        {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_claim}},
                    ],
                },
            },
        },
    }

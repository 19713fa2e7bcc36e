"""The Kubernetes objects of one titan-moe run, as plain dicts.

Plain data structures, no templating: each function builds one object from a
``Run`` (the run config plus the cluster shape and options) and the tests
validate the result against the Kubernetes and JobSet schemas.

Failure model (the pattern the JobSet project documents for preemption):

* one ReplicatedJob ``node`` with one Indexed Job of N pods (one per node,
  G GPUs each), ``restartPolicy: Never`` and ``backoffLimit: 0``: any pod
  failure fails the Job, and with it the JobSet;
* the Job's ``podFailurePolicy`` fails it with reason ``PodFailurePolicy``
  when the pod explains its failure -- the ``DisruptionTarget`` condition
  (preemption, drain, eviction, node loss) or an entrypoint status from
  ``exitcodes.py`` (75 preempted, 76 peer lost, 78 rank failed, 77 crash
  loop) -- and with ``BackoffLimitExceeded`` otherwise;
* the JobSet's ``failurePolicy`` fails the run on the crash-loop status and
  restarts the whole group for free on every other explained failure: the
  entrypoint's progress budget (``attempts.py``), not ``maxRestarts``, bounds
  those.  Unexplained failures count against ``maxRestarts``.
  ``BlockingRecreate`` deletes every old pod before any new one starts, so
  two generations never meet at the rendezvous;
* every new generation starts torchrun from scratch and the trainer resumes
  from the latest checkpoint in ``<runs>/<run>/<checkpoint folder>``;
* rendezvous is static: pod 0 (node rank 0) hosts the store, the others
  connect to its DNS name, retrying until it resolves and listens (up to
  ``--join-timeout``), so no pod's role depends on DNS timing.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from jobs.k8s import exitcodes, podspec
from jobs.k8s.exitcodes import (
    ATTEMPT_ANNOTATION,
    ATTEMPT_ENV,
    CHECKPOINT_DIR_ENV,
    CRASH_LOOP_LIMIT_ENV,
    NETWORK_ENV,
    RUN_DIR_ENV,
)
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
# PID 1 of a trainer pod (jobs/k8s/entrypoint.py): torchrun in-process, SIGTERM to the workers.
ENTRYPOINT_MODULE = "jobs.k8s.entrypoint"
# What torchrun starts per GPU: the trainer, with a lost peer told apart from a failure (jobs/k8s/worker.py).
WORKER_MODULE = "jobs.k8s.worker"
TRAINER_CONTAINER = "trainer"
TENSORBOARD_RESOURCES = ("1", "4Gi")  # cpu, memory of the TensorBoard pod


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


def trainer_script(run: Run) -> str:
    """The node pod's shell command: exec the entrypoint (torchrun) with this pod's node rank.

    ``exec`` makes the entrypoint PID 1 of the container, so the kubelet's SIGTERM
    reaches it; it hands the signal to the workers and leaves torchrun alone (see
    jobs/k8s/entrypoint.py).  Static rendezvous: node rank = completion index
    (``JOB_COMPLETION_INDEX``, set by the Job controller on every pod of an Indexed
    Job), and rank 0 -- always the pod with index 0 -- hosts the store at its own
    address.  No in-pod restarts (``--max_restarts=0``): a failed worker fails the
    pod, and the JobSet restarts the group.
    """
    o = run.options
    torchrun = [
        f"--nnodes={run.nodes}",
        f"--nproc_per_node={run.gpus_per_node}",
        '--node_rank="${JOB_COMPLETION_INDEX}"',
        "--rdzv_backend=static",
        f"--master_addr={run.leader_host}",
        f"--master_port={RDZV_PORT}",
        f"--rdzv_conf=timeout={o.join_timeout_s}",
        "--max_restarts=0",
    ]
    trainer = [
        ["-m", WORKER_MODULE, TRAIN_MODULE],
        ["--job.config_file", f"{CONFIG_MOUNT}/{CONFIG_KEY}"],
        # The render's own overrides; the cluster settings below come later and win.
        *([word] for word in run.config.overrides),
        # Everything the run writes goes to the shared volume, under its own folder.
        ["--job.dump_folder", run.run_dir],
        # Auto-resume after a restart needs checkpoints, whatever the TOML says.
        ["--checkpoint.enable"],
        ["--checkpoint.folder", run.config.checkpoint_folder],
        # The save budget after SIGTERM, from the pod's grace period (options.trainer_grace_s).
        ["--checkpoint.preemption_grace_seconds", str(o.trainer_grace_s)],
        ["--metrics.enable_tensorboard"],
        ["--metrics.save_tb_folder", run.config.tb_folder],
        ["--data.local_cache", DATA_CACHE_MOUNT],
        # Streaming evicts shards below the emptyDir's sizeLimit (over it, the pod is evicted).
        ["--data.cache_limit", o.data_cache_limit],
    ]
    # Quote the fixed words; the node-rank word keeps its "${...}" for the shell.
    lines = [f"exec python -m {ENTRYPOINT_MODULE}"]
    lines += [w if w.startswith("--node_rank=") else shlex.quote(w) for w in torchrun]
    lines += [" ".join(shlex.quote(w) for w in pair) for pair in trainer]
    return " \\\n  ".join(lines) + "\n"


def configmap(run: Run) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, f"{run.name}-config", "config"),
        "data": {CONFIG_KEY: run.config.text},
    }


def _trainer_pod_spec(run: Run) -> dict:
    o = run.options
    extended = {o.gpu_resource: str(run.gpus_per_node)}
    if o.rdma is not None:
        extended[o.rdma.name] = str(o.rdma.count)
    env = [
        *podspec.base_env(),
        {"name": "TITAN_MOE_RUN", "value": run.name},
        {"name": NETWORK_ENV, "value": o.network},
        # The entrypoint's progress budget (jobs/k8s/attempts.py).
        {"name": RUN_DIR_ENV, "value": run.run_dir},
        {"name": CHECKPOINT_DIR_ENV, "value": run.checkpoint_dir},
        {"name": CRASH_LOOP_LIMIT_ENV, "value": str(o.crash_loop_limit)},
        {"name": ATTEMPT_ENV, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{ATTEMPT_ANNOTATION}']"}}},
        *({"name": k, "value": v} for k, v in o.trainer_env.items()),
        *podspec.credentials_env(o),
    ]
    tmp, tmp_mount = podspec.tmp_volume()
    container = podspec.container(
        TRAINER_CONTAINER,
        run.image,
        ["/bin/bash", "-c"],
        args=[trainer_script(run)],
        env=env,
        ports=[{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}],
        resources=podspec.guaranteed(
            o.cpu_for(run.gpus_per_node), o.memory_for(run.gpus_per_node), extended,
            ephemeral_storage=podspec.gibibytes(o.data_cache_size, podspec.TMP_SIZE),
        ),
        mounts=[
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "runs", "mountPath": o.runs_mount},
            {"name": "data-cache", "mountPath": DATA_CACHE_MOUNT},
            tmp_mount,
        ],
        # RDMA only: pinning memory for the NICs (and the reason such pods are not "restricted").
        add_capabilities=podspec.RDMA_CAPABILITIES if o.rdma is not None else (),
    )
    volumes = [
        {"name": "config", "configMap": {"name": f"{run.name}-config"}},
        # Docker's default 64Mi /dev/shm starves DataLoader workers; memory-backed, sized.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": o.shm_for(run.gpus_per_node)}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_claim}},
        {"name": "data-cache", "emptyDir": {"sizeLimit": o.data_cache_size}},
        tmp,
    ]
    # restartPolicy Never: required by podFailurePolicy; restarts are the JobSet's.
    return podspec.pod_spec(o, [container], volumes, gpus=True, grace_period_s=o.grace_period_s)


def _on_exit_codes(codes: tuple[int, ...]) -> dict:
    return {"containerName": TRAINER_CONTAINER, "operator": "In", "values": list(codes)}


def pod_failure_policy() -> dict:
    """How the Job judges a failed trainer pod (k8s/README.md, "What each failure costs").

    Every rule is ``FailJob``: one failed pod fails the Job, so the JobSet
    recreates the whole group (``BlockingRecreate``: no new pod meets an old
    one at the rendezvous).  ``Ignore`` would replace just the failed pod, in
    the same Job, while its peers of the old attempt may still be up -- and a
    static rendezvous has no generation fence against such a mix.  The rules
    only decide the Job's failure *message*, which the JobSet's rules read:
    the first matching rule wins, so the crash loop comes first.  A status no
    rule names (a container killed from outside, an entrypoint that itself
    crashed, a setup error) fails the Job with ``BackoffLimitExceeded``.
    """
    return {
        "rules": [
            # The entrypoint's progress budget is spent: the JobSet rule "CrashLoop" ends the run.
            {"action": "FailJob", "onExitCodes": _on_exit_codes((exitcodes.CRASH_LOOP,))},
            # Preempted / evicted / node lost, as Kubernetes reports it on the pod.
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # Preempted (75), a peer pod vanished (76), a rank of this pod failed (78): the
            # entrypoint said what happened and counted the attempt in the progress budget.
            {"action": "FailJob", "onExitCodes": _on_exit_codes(exitcodes.FREE_RESTART)},
        ]
    }


# The Job controller's message for a FailJob exit-code rule (pkg/controller/job/pod_failure_policy.go):
# "Container trainer for pod NS/NAME failed with exit code 77 matching FailJob rule at index 0".
CRASH_LOOP_MESSAGE = f"failed with exit code {exitcodes.CRASH_LOOP} matching FailJob rule"


def jobset_failure_policy(max_restarts: int) -> dict:
    """The JobSet's answer to a failed Job: end on a crash loop, restart for free on what the pods explained."""
    return {
        "maxRestarts": max_restarts,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {
                "name": "CrashLoop",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [CRASH_LOOP_MESSAGE],
            },
            {
                # Preemption, a lost node or peer, a rank failure: the progress budget bounds these.
                "name": "RestartWithoutCounting",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
            },
            # Anything else (BackoffLimitExceeded): the default RestartJobSet, counted against maxRestarts.
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
        "podFailurePolicy": pod_failure_policy(),
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
            "failurePolicy": jobset_failure_policy(o.max_restarts),
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
    tmp, tmp_mount = podspec.tmp_volume()
    container = podspec.container(
        "tensorboard",
        run.image,  # the training image has tensorboard
        [
            "tensorboard",
            f"--logdir={run.tensorboard_dir}",
            "--bind_all",
            f"--port={TENSORBOARD_PORT}",
            "--reload_interval=30",
        ],
        env=podspec.base_env(),
        ports=[{"name": "http", "containerPort": TENSORBOARD_PORT, "protocol": "TCP"}],
        resources=podspec.guaranteed(*TENSORBOARD_RESOURCES),
        mounts=[{"name": "runs", "mountPath": o.runs_mount, "readOnly": True}, tmp_mount],
    )
    container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10}
    # A wedged TensorBoard (it can hang reloading huge event files) gets restarted.
    container["livenessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "initialDelaySeconds": 60,
                                  "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 4}
    volumes = [{"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_claim, "readOnly": True}}, tmp]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(run, f"{run.name}-tensorboard", "tensorboard"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _tensorboard_selector(run)},
            "template": {
                "metadata": {"labels": _labels(run, "tensorboard")},
                "spec": podspec.pod_spec(o, [container], volumes, gpus=False, restart_policy="Always"),
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
    extended = {o.gpu_resource: str(o.eval_gpus)} if o.eval_gpus else {}
    tmp, tmp_mount = podspec.tmp_volume()
    container = podspec.container(
        "eval",
        run.image,
        eval_command(run),
        env=[*podspec.base_env(), *podspec.credentials_env(o)],
        resources=podspec.guaranteed(o.cpu_for(o.eval_gpus), o.memory_for(o.eval_gpus), extended),
        mounts=[
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "runs", "mountPath": o.runs_mount},
            tmp_mount,
        ],
    )
    volumes = [
        {"name": "config", "configMap": {"name": f"{run.name}-config"}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_claim}},
        tmp,
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(run, f"{run.name}-eval", "eval", queue=True),
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": _labels(run, "eval")},
                "spec": podspec.pod_spec(o, [container], volumes, gpus=bool(o.eval_gpus)),
            },
        },
    }

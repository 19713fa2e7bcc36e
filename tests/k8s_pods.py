"""The rendered trainer pods, run as local processes: what the Job controller, JobSet and kubelet supply.

No cluster here, so the tests play the controllers: they take the trainer
container's command and environment from the rendered JobSet and supply what
Kubernetes would -- the completion index (Job controller), the restart-attempt
annotation (JobSet), pod 0's DNS name resolving to 127.0.0.1 (JobSet's
headless Service), the ConfigMap, the shared run volume and a fresh emptyDir
per pod (kubelet), the Secret's values -- then start each "pod" as its own
local process group, on CPU with one process each.  Pods get a fresh
rendezvous port per generation because here they share one network namespace
(on a cluster each pod has its own).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.k8s import render_run
from jobs.k8s.entrypoint import child_pids
from jobs.k8s.exitcodes import ATTEMPT_ANNOTATION
from jobs.k8s.manifests import CONFIG_KEY
from jobs.k8s.options import RDZV_PORT
from tests.k8s_support import IMAGE, load, trainer_pod

VENV_BIN = Path(sys.executable).parent
SECRET = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret"}  # S3_ENDPOINT_URL: optional
START_TIMEOUT_S = 420  # two torch imports + rendezvous on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPods:
    """Run the rendered trainer pods as local process groups."""

    def __init__(self, jobset: dict, configmap: dict, root: Path):
        self.root = root
        pod = trainer_pod(jobset)
        (self.container,) = pod["containers"]
        self.volumes = {v["name"]: v for v in pod["volumes"]}
        self.nodes = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"]
        self.grace_s = pod["terminationGracePeriodSeconds"]
        name = jobset["metadata"]["name"]
        # What the JobSet's headless Service resolves for the completion-index-0 pod.
        self.leader = f"--master_addr={name}-node-0-0.{jobset['spec']['network']['subdomain']}"
        (self.script,) = self.container["args"]
        assert self.leader in self.script and f"--master_port={RDZV_PORT}" in self.script
        # The ConfigMap, as the kubelet would project it.
        self.config_dir = root / f"configmap-{name}"
        self.config_dir.mkdir()
        for key, text in configmap["data"].items():
            (self.config_dir / key).write_text(text)
        self.runs = root / "runs"  # the ReadWriteMany claim: shared by every pod, generation and run
        self.runs.mkdir(exist_ok=True)
        self.name = name
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _volume_path(self, mount: dict, pod_dir: Path) -> str | None:
        volume = self.volumes[mount["name"]]
        if "configMap" in volume:
            return str(self.config_dir)
        if "persistentVolumeClaim" in volume:
            return str(self.runs)
        if volume.get("emptyDir", {}).get("medium") == "Memory":
            return None  # /dev/shm: this machine's own
        path = pod_dir / mount["name"]  # a plain emptyDir: fresh for every pod
        path.mkdir()
        return str(path)

    def _command_and_env(self, index: int, port: int, pod_dir: Path, generation: int) -> tuple[str, dict]:
        script = self.script.replace(self.leader, "--master_addr=127.0.0.1")
        script = script.replace(f"--master_port={RDZV_PORT}", f"--master_port={port}")
        mounts = {}
        for mount in self.container["volumeMounts"]:
            local = self._volume_path(mount, pod_dir)
            if local is not None:
                mounts[mount["mountPath"]] = local
        # One pass, so a local path (under /tmp itself) is not rewritten again by the /tmp mount.
        paths = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        script = re.sub(rf"(?<=[\s=])({paths})(?=[/\s]|$)", lambda m: mounts[m.group(1)], script)

        def local(value: str) -> str:  # a container path in an env value (e.g. /runs/<run>/checkpoint)
            return re.sub(rf"^({paths})(?=/|$)", lambda m: mounts[m.group(1)], value)
        env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the image's PATH starts with its venv
            "HOME": os.environ.get("HOME", "/root"),
            "OMP_NUM_THREADS": "1",  # two "nodes" share two cores here
            "JOB_COMPLETION_INDEX": str(index),  # set by the Job controller on Indexed Jobs
        }
        for item in self.container["env"]:
            if "value" in item:
                env[item["name"]] = local(item["value"])  # HOME=/tmp: the pod's emptyDir
                continue
            field = item["valueFrom"].get("fieldRef", {}).get("fieldPath")
            if field == f"metadata.annotations['{ATTEMPT_ANNOTATION}']":
                env[item["name"]] = str(generation - 1)  # the JobSet's restarts so far
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in SECRET:
                env[item["name"]] = SECRET[ref["key"]]
            else:
                assert ref.get("optional"), f"secret key {ref['key']} is required but the test Secret lacks it"
        return script, env

    def start(self, generation: int) -> None:
        port = free_port()
        self.procs, self.logs = [], []
        for index in range(self.nodes):
            pod_dir = self.root / f"{self.name}-gen{generation}-pod{index}"
            pod_dir.mkdir()
            script, env = self._command_and_env(index, port, pod_dir, generation)
            log = pod_dir / "log.txt"
            with open(log, "wb") as f:
                proc = subprocess.Popen(
                    [*self.container["command"], script],
                    env=env,
                    cwd=pod_dir,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # one process group per pod, like a container
                )
            self.procs.append(proc)
            self.logs.append(log)

    def sigterm_pod(self, index: int) -> None:
        """What the kubelet does first when it takes a pod away: SIGTERM to PID 1 only."""
        self.procs[index].send_signal(signal.SIGTERM)

    def wait_all(self, timeout_s: float) -> list[int]:
        """Exit statuses of every pod; fail if one outlives ``timeout_s`` (the kubelet would SIGKILL it)."""
        deadline = time.monotonic() + timeout_s
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"pod {i} still running after the {timeout_s:.0f}s grace period:\n{self.output()}")
        return [proc.returncode for proc in self.procs]

    def workers(self, index: int) -> list[int]:
        """The trainer processes of pod ``index``: the children of its PID 1 (the entrypoint)."""
        return child_pids(self.procs[index].pid)

    def kill_worker(self, index: int) -> None:
        """A worker dies on its own (the OOM killer's SIGKILL): the pod's PID 1 lives on."""
        (pid,) = self.workers(index)
        os.kill(pid, signal.SIGKILL)

    def wait_pod(self, index: int, timeout_s: float) -> int:
        try:
            return self.procs[index].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pod {index} still running after {timeout_s:.0f}s:\n{self.output()}")

    def kill_pod(self, index: int) -> None:
        """A lost node: every process of the pod dies at once."""
        kill_tree(self.procs[index])

    def terminate_all(self) -> None:
        """Pod deletion: SIGTERM to PID 1 (the entrypoint), SIGKILL of what is left after the grace period."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_tree(proc)

    def output(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs)

    def assert_running(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                pytest.fail(f"pod {i} exited with {proc.returncode} before the test was done:\n{self.output()}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a pod's every process, as the end of its container does.

    Not just the pod's process group: torchrun starts each worker in a session
    of its own, so a group kill would leave the workers training.  The tree is
    stopped first, so that nothing forks between the listing and the kill.
    """
    if proc.poll() is None:
        tree, todo = [], [proc.pid]
        while todo:
            pid = todo.pop()
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            tree.append(pid)
            todo += child_pids(pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def committed_steps(folder: Path) -> list[int]:
    """Checkpoint steps that a resume may load (the trainer's own definition)."""
    from titan_moe.checkpoint import catalog

    return [info.step for info in catalog.list_checkpoints(str(folder)) if info.loadable]


def metric_steps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def wait_for(condition, pods: LocalPods, what: str, timeout_s: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        pods.assert_running()
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{pods.output()}")


def local_pods(tmp_path: Path, config: Path, name: str, **options) -> LocalPods:
    out = tmp_path / f"manifests-{name}"
    render_run(config, 2, 1, IMAGE, out, name=name, **options)
    jobset, configmap = load(out / "jobset.yaml"), load(out / "configmap.yaml")
    assert CONFIG_KEY in configmap["data"]
    return LocalPods(jobset, configmap, tmp_path)

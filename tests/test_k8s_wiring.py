"""The rendered JobSet's command really starts a multi-node run, and really resumes after a lost node.

No cluster here, so this test plays the controllers: it takes the trainer
container's command and environment from the rendered JobSet, and supplies
what Kubernetes would -- the completion index (Job controller), the leader's
DNS name resolving to 127.0.0.1 (JobSet's headless Service), the ConfigMap,
the shared run volume and a fresh emptyDir per pod (kubelet), the Secret's
values -- then starts each "pod" as its own local process group, on CPU with
one process each.  Pods get a fresh rendezvous port per generation because
here they share one network namespace (on a cluster each pod has its own).

Then it loses a node the way a preemption does (SIGKILL of one pod) and
restarts the group the way the failure policy does (BlockingRecreate: SIGTERM
the surviving pod, wait for it to go, start every pod again with the same
command): the new generation must continue from the latest checkpoint.
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
from jobs.k8s.manifests import CONFIG_KEY
from tests.k8s_support import IMAGE, load, run_toml, trainer_pod

VENV_BIN = Path(sys.executable).parent
SECRET = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret"}  # S3_ENDPOINT_URL: optional
START_TIMEOUT_S = 420  # two torch imports + rendezvous on a busy 2-core machine


def _free_port() -> int:
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
        self.leader_endpoint = f"{name}-node-0-0.{jobset['spec']['network']['subdomain']}:29500"
        (self.script,) = self.container["args"]
        assert self.leader_endpoint in self.script
        # The ConfigMap, as the kubelet would project it.
        self.config_dir = root / "configmap"
        self.config_dir.mkdir()
        for key, text in configmap["data"].items():
            (self.config_dir / key).write_text(text)
        self.runs = root / "runs"  # the ReadWriteMany claim: shared by every pod and generation
        self.runs.mkdir()
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

    def _command_and_env(self, index: int, port: int, pod_dir: Path) -> tuple[str, dict]:
        script = self.script.replace(self.leader_endpoint, f"127.0.0.1:{port}")
        for mount in self.container["volumeMounts"]:
            local = self._volume_path(mount, pod_dir)
            if local is not None:
                script = re.sub(rf"(?<=[\s=]){re.escape(mount['mountPath'])}(?=[/\s]|$)", local, script)
        env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the image's PATH starts with its venv
            "HOME": os.environ.get("HOME", "/root"),
            "OMP_NUM_THREADS": "1",  # two "nodes" share two cores here
            "JOB_COMPLETION_INDEX": str(index),  # set by the Job controller on Indexed Jobs
        }
        for item in self.container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in SECRET:
                env[item["name"]] = SECRET[ref["key"]]
            else:
                assert ref.get("optional"), f"secret key {ref['key']} is required but the test Secret lacks it"
        return script, env

    def start(self, generation: int) -> None:
        port = _free_port()
        self.procs, self.logs = [], []
        for index in range(self.nodes):
            pod_dir = self.root / f"gen{generation}-pod{index}"
            pod_dir.mkdir()
            script, env = self._command_and_env(index, port, pod_dir)
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

    def kill_pod(self, index: int) -> None:
        """A lost node: every process of the pod dies at once."""
        _signal_group(self.procs[index], signal.SIGKILL)
        self.procs[index].wait()

    def terminate_all(self) -> None:
        """Pod deletion: SIGTERM to PID 1 (torchrun), SIGKILL of what is left after the grace period."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def output(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs)

    def assert_running(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                pytest.fail(f"pod {i} exited with {proc.returncode} before the test was done:\n{self.output()}")


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this test created for the pod
    except ProcessLookupError:
        pass


def committed_steps(folder: Path) -> list[int]:
    """Checkpoint steps that a resume may load (the trainer's own definition)."""
    from titan_moe.checkpoint import catalog

    return [info.step for info in catalog.list_checkpoints(str(folder)) if info.loadable]


def metric_steps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _wait_for(condition, pods: LocalPods, what: str, timeout_s: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        pods.assert_running()
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{pods.output()}")


@pytest.mark.slow
def test_rendered_jobset_rendezvous_trains_and_resumes_after_losing_a_node(tmp_path):
    # Never finishes on its own (the test stops it); a full checkpoint every 3 steps.
    config = tmp_path / "wire.toml"
    config.write_text(run_toml(steps=100_000, checkpoint="interval = 3") + "[metrics]\nlog_freq = 1\n")
    out = tmp_path / "manifests"
    render_run(config, 2, 1, IMAGE, out, name="wire")
    jobset, configmap = load(out / "jobset.yaml"), load(out / "configmap.yaml")
    assert CONFIG_KEY in configmap["data"]
    pods = LocalPods(jobset, configmap, tmp_path)
    run_dir = pods.runs / "wire"
    ckpt, metrics = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    try:
        # Generation 1: both pods rendezvous through the "leader" and train to a committed checkpoint.
        pods.start(generation=1)
        _wait_for(lambda: ckpt.is_dir() and committed_steps(ckpt), pods, "a committed checkpoint")
        gen1_text = "\n".join(p.read_text(errors="replace") for p in pods.logs)
        assert "world 2" in gen1_text, "the two pods must form one world of 2 ranks"

        # A node is lost; the JobSet recreates the group: old pods all gone before new ones start.
        pods.kill_pod(1)
        pods.terminate_all()
        latest = max(committed_steps(ckpt))
        seen = len(metric_steps(metrics))
        gen1_loss = {m["step"]: m["loss_metrics/global_avg_loss"] for m in metric_steps(metrics)}

        # Generation 2: same command, same volume: training continues after the checkpoint.
        pods.start(generation=2)
        new = _wait_for(lambda: metric_steps(metrics)[seen:][:2] if len(metric_steps(metrics)) >= seen + 2 else None,
                        pods, "two training steps of the restarted group")
        assert [m["step"] for m in new] == [latest + 1, latest + 2], (
            f"expected the restart to resume after checkpoint step-{latest}:\n{pods.output()}"
        )
        if latest + 1 in gen1_loss:
            # The first generation got past the checkpoint too: a faithful resume repeats its loss.
            assert new[0]["loss_metrics/global_avg_loss"] == pytest.approx(gen1_loss[latest + 1], rel=1e-4)
    finally:
        pods.terminate_all()

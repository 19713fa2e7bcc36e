"""Every rendered pod: restricted Pod Security, Guaranteed QoS, the network it asked for, and preemption that fits.

The restricted/QoS rules are checked by ``tests/k8s_support.py`` (written from
the Pod Security Standards and the kubelet's QoS rules); the checker itself is
tested on pods that break each rule, so a passing render means something.
"""

from __future__ import annotations

import copy
import sys
import time

import pytest

from jobs.k8s import render_run
from jobs.k8s.entrypoint import exit_status, network_mismatch
from jobs.k8s.exitcodes import IMAGE_NETWORK_ENV, NETWORK_ENV, PEER_LOST, RANK_FAILED
from jobs.k8s.exitcodes import PREEMPTED as PREEMPTED_EXIT_CODE
from jobs.k8s.options import CACHE_LIMIT_FRACTION, TEARDOWN_MARGIN_S, RenderOptions
from jobs.k8s.prep import PrepSpec, build
from tests.k8s_support import IMAGE, load, pod_specs, qos_class, restricted_violations, trainer_pod, write_config

NETWORKS = ("tcp", "infiniband", "efa")


def _render(tmp_path, **options) -> dict[str, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    queue = options.pop("queue", None)
    render_run(write_config(tmp_path), 2, 4, IMAGE, out, queue, **options)
    return {p.name: load(p) for p in out.glob("*.yaml") if p.name != "kustomization.yaml"}


def _all_pods(objects: dict[str, dict]) -> list[tuple[str, dict]]:
    return [(f"{file} {where}", pod) for file, obj in objects.items() for where, pod in pod_specs(obj)]


@pytest.mark.parametrize("network", NETWORKS)
def test_every_pod_is_restricted_and_guaranteed(tmp_path, network):
    objects = _render(tmp_path, network=network, service_account="sa", image_pull_secrets=("regcred",))
    prep = build(PrepSpec("s3://corpus/olmoe-mix", "s3://data/mds", shards=4), IMAGE, RenderOptions())
    pods = _all_pods(objects) + _all_pods(prep)
    assert len(pods) == 5  # trainer, TensorBoard, eval, prep shards, prep finalize
    for where, pod in pods:
        assert qos_class(pod) == "Guaranteed", where
        assert pod["automountServiceAccountToken"] is False, where
        violations = restricted_violations(pod)
        if network != "tcp" and "jobset" in where:
            # RDMA memory registration: the one documented exception, and only on the trainer.
            assert violations == ["container trainer: adds capability IPC_LOCK (not even baseline)"], where
        else:
            assert violations == [], where


def test_the_policy_checks_can_fail(tmp_path):
    pod = trainer_pod(_render(tmp_path)["jobset.yaml"])
    assert restricted_violations(pod) == [] and qos_class(pod) == "Guaranteed"
    broken = copy.deepcopy(pod)
    broken["securityContext"].pop("runAsNonRoot")
    broken["containers"][0]["securityContext"].pop("runAsNonRoot")
    broken["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    broken["hostNetwork"] = True
    broken["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(broken) == [
        "spec.hostNetwork",
        "volume host: ['hostPath']",
        "container trainer: allowPrivilegeEscalation must be false",
        "container trainer: runAsNonRoot must be true",
    ]
    burstable = copy.deepcopy(pod)
    burstable["containers"][0]["resources"]["limits"].pop("memory")
    assert qos_class(burstable) == "Burstable"
    best_effort = copy.deepcopy(pod)
    best_effort["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "4"}}
    assert qos_class(best_effort) == "BestEffort"


def test_resources_are_sized_per_gpu_and_can_be_set(tmp_path):
    pod = trainer_pod(_render(tmp_path)["jobset.yaml"])
    res = pod["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "4"}  # 8 cores, 64Gi per GPU
    # The scheduler needs a disk for the data cache (100Gi) and /tmp (16Gi).
    assert res["requests"] == {**res["limits"], "ephemeral-storage": "116Gi"}

    pod = trainer_pod(_render(tmp_path / "b", cpu="90", memory="1500Gi", data_cache_size="1Ti")["jobset.yaml"])
    res = pod["containers"][0]["resources"]
    assert (res["limits"]["cpu"], res["limits"]["memory"]) == ("90", "1500Gi")
    assert res["requests"]["ephemeral-storage"] == "1040Gi"


def test_data_cache_limit_follows_the_emptydir(tmp_path):
    from titan_moe.common.units import parse_bytes

    for size, expected_bytes in (("100Gi", 100 * 2**30), ("500G", 500 * 10**9)):
        options = RenderOptions(data_cache_size=size)
        limit = parse_bytes(options.data_cache_limit, "data.cache_limit")  # the trainer's own parser
        assert expected_bytes * CACHE_LIMIT_FRACTION - 2**20 < limit <= expected_bytes * CACHE_LIMIT_FRACTION


@pytest.mark.parametrize(
    ("network", "resource", "env"),
    [
        ("tcp", None, {}),
        ("infiniband", ("rdma/rdma_shared_device_a", "1"), {"NCCL_NET": "IB", "NCCL_IB_DISABLE": "0"}),
        ("efa", ("vpc.amazonaws.com/efa", "32"), {"NCCL_NET": "AWS Libfabric", "FI_PROVIDER": "efa",
                                                  "FI_EFA_USE_DEVICE_RDMA": "1"}),
    ],
)
def test_network_adds_rdma_devices_capability_and_nccl_settings(tmp_path, network, resource, env):
    pod = trainer_pod(_render(tmp_path, network=network)["jobset.yaml"])
    (container,) = pod["containers"]
    values = {e["name"]: e.get("value") for e in container["env"]}
    assert values[NETWORK_ENV] == network
    nccl = {k: v for k, v in values.items() if k.startswith(("NCCL_", "FI_"))}
    assert env.items() <= nccl.items() and (nccl == {}) == (network == "tcp")
    extended = {k: v for k, v in container["resources"]["limits"].items() if k not in ("cpu", "memory")}
    assert extended == {"nvidia.com/gpu": "4", **(dict([resource]) if resource else {})}
    caps = container["securityContext"]["capabilities"]
    assert caps.get("add", []) == ([] if network == "tcp" else ["IPC_LOCK"]) and caps["drop"] == ["ALL"]


def test_rdma_resource_and_extra_nccl_variables_override_the_defaults(tmp_path):
    pod = trainer_pod(_render(tmp_path, network="infiniband", rdma_resource="rdma/ib=4",
                              nccl_env=("NCCL_IB_HCA=mlx5_0,mlx5_1", "NCCL_NET=IB", "NCCL_SOCKET_IFNAME=net1"))
                      ["jobset.yaml"])
    (container,) = pod["containers"]
    values = {e["name"]: e.get("value") for e in container["env"]}
    assert values["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and values["NCCL_SOCKET_IFNAME"] == "net1"
    assert [e["name"] for e in container["env"]].count("NCCL_SOCKET_IFNAME") == 1
    assert container["resources"]["limits"]["rdma/ib"] == "4"
    assert "rdma/rdma_shared_device_a" not in container["resources"]["limits"]


def test_workload_identity_needs_no_static_keys(tmp_path):
    objects = _render(tmp_path, s3_secret=None, service_account="titan-irsa", image_pull_secrets=("a", "b"))
    for where, pod in _all_pods(objects):
        names = {e["name"] for c in pod["containers"] for e in c["env"]}
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}, where
        assert pod["serviceAccountName"] == "titan-irsa", where
        assert pod["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}], where


def test_preemption_budget_fits_the_trainers_own_rule(tmp_path):
    """The renderer's arithmetic against titan_moe.checkpoint.PreemptionHandler itself.

    A step of ``step_seconds`` is in flight when SIGTERM lands and one more runs
    before the ranks have agreed to stop; a save of ``checkpoint_seconds`` must then
    still be affordable -- and only just, so the
    grace period is not padded blindly.
    """
    from titan_moe.checkpoint import PREEMPTED_EXIT_CODE as TRAINER_EXIT
    from titan_moe.checkpoint import PreemptionHandler

    assert TRAINER_EXIT == PREEMPTED_EXIT_CODE
    for step_s, save_s in ((30, 60), (5, 600), (120, 20)):
        options = RenderOptions(step_seconds=step_s, checkpoint_seconds=save_s)
        handler = PreemptionHandler(options.trainer_grace_s, signals=())
        handler.requested_at = time.monotonic() - 2 * step_s
        assert handler.can_afford_save(save_s), (step_s, save_s)
        handler.requested_at = time.monotonic() - 2 * step_s - 2
        assert not handler.can_afford_save(save_s), "budget is padded by more than a second"
        assert options.grace_period_s == options.trainer_grace_s + TEARDOWN_MARGIN_S
    assert (RenderOptions().trainer_grace_s, RenderOptions().grace_period_s) == (152, 182)  # the README's numbers


def test_rendered_trainer_flags_reach_the_trainer_config(tmp_path):
    """The overrides the renderer appends parse with the trainer's own config manager."""
    import shlex

    from titan_moe.run_config.job_config import parse_run_config

    objects = _render(tmp_path, checkpoint_seconds=100, step_seconds=10, data_cache_size="10Gi")
    pod = trainer_pod(objects["jobset.yaml"])
    words = shlex.split(pod["containers"][0]["args"][0].replace("\\\n", " "))
    trainer_args = words[words.index("titan_moe.train") + 1:]
    config_path = tmp_path / "run.toml"
    config_path.write_text(objects["configmap.yaml"]["data"]["run.toml"])
    trainer_args[trainer_args.index("/config/run.toml")] = str(config_path)
    config = parse_run_config(trainer_args)
    assert config.checkpoint.preemption_grace_seconds == 2 * 10 + 151 + 1 == RenderOptions(
        checkpoint_seconds=100, step_seconds=10).trainer_grace_s
    assert config.data.cache_limit == f"{int(10 * 1024 * 0.9)}mb"
    assert pod["terminationGracePeriodSeconds"] == 172 + TEARDOWN_MARGIN_S


def test_exit_status_mapping():
    assert exit_status([75, 75]) == 75
    assert exit_status([75, -15]) == 75  # torchrun SIGTERMs the rest once one worker has exited
    assert exit_status([-15, -15], sigterm=True) == 75  # forwarded SIGTERM while still importing
    assert exit_status([76, -15], sigterm=True) == 75  # a peer pod stopped during its start-up
    assert exit_status([76, -15]) == exit_status([76]) == PEER_LOST
    # A crash is a crash, even next to a preempted or peer-less rank, and so is a signal other than SIGTERM.
    for codes in ([75, 1], [76, 1], [1], [-9], [-6, 76], [2]):
        assert exit_status(codes) == RANK_FAILED, codes
        assert exit_status(codes, sigterm=True) == RANK_FAILED, codes


def test_image_built_for_another_network_is_refused(monkeypatch):
    monkeypatch.setenv(NETWORK_ENV, "efa")
    monkeypatch.setenv(IMAGE_NETWORK_ENV, "tcp")
    assert network_mismatch() == ("the manifests ask for --network efa but the image was built with NETWORK=tcp; "
                                  "rebuild it with docker build --build-arg NETWORK=efa (k8s/Dockerfile)")
    monkeypatch.setenv(IMAGE_NETWORK_ENV, "efa")
    assert network_mismatch() is None
    monkeypatch.setenv(NETWORK_ENV, "tcp")
    monkeypatch.setenv(IMAGE_NETWORK_ENV, "infiniband")  # an RDMA image runs TCP fine
    assert network_mismatch() is None


WORKER = """
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(time.monotonic()))
print("ready", flush=True)
while not got:
    time.sleep(0.05)
time.sleep({hold})  # a final save longer than torchrun's fixed 30 s
print("saved", flush=True)
sys.exit(75)
"""


@pytest.mark.slow
def test_entrypoint_gives_workers_more_than_torchruns_30s_and_exits_75(tmp_path):
    """Plain torchrun SIGKILLs a saving worker 30 s after SIGTERM and exits 1; the entrypoint must not."""
    import subprocess

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(hold=35))
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.k8s.entrypoint", "--standalone", "--nproc_per_node=2",
                                 str(worker)], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while log.read_text().count("ready") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(__import__("signal").SIGTERM)  # PID 1 only, as the kubelet does
        assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.count("saved") == 2, text
    assert "workers stopped for preemption (rank 0: 75, rank 1: 75); exiting 75" in text

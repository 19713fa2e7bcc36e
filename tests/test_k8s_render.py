"""`titan-moe k8s render`: schema-valid manifests with the failure/rendezvous invariants.

No API server here: built-in kinds are checked with kubernetes-validate's
bundled schemas (strict) and the JobSet with its CRD's OpenAPI schema made
strict (unknown fields rejected).
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib

import pytest
import yaml

from eval.cli import build_parser as build_eval_parser
from jobs.k8s import RenderOptions, render_run
from jobs.k8s.cli import main as k8s_main
from jobs.k8s.options import max_name_length, name_from_stem
from jobs.k8s.validate import KUBERNETES_VERSION, validate_dir, validate_object
from tests.k8s_support import IMAGE, REPO, crd_path, load, qos_class, restricted_violations, trainer_pod, write_config
from titan_moe.common.errors import ConfigError

# 1.31: podFailurePolicy (onExitCodes) and the DisruptionTarget condition went GA;
# 1.33: the version the manifests target; 1.37: the newest bundled schemas.
VERSIONS = ("1.31.0", KUBERNETES_VERSION, "1.37.0")

EXPECTED_FILES = {
    "configmap.yaml",
    "jobset.yaml",
    "tensorboard-deployment.yaml",
    "tensorboard-service.yaml",
    "eval-job.yaml",
    "kustomization.yaml",
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One 4-node x 8-GPU EP render with a Kueue queue and a namespace, shared by the invariant tests."""
    tmp = tmp_path_factory.mktemp("k8s")
    config = write_config(tmp, "moe-ep8", expert_parallel_degree=8)
    out = tmp / "out"
    paths = render_run(config, 4, 8, IMAGE, out, queue="team-a", namespace="titan-moe")
    return config, out, paths


def _script_words(jobset: dict) -> list[str]:
    (container,) = trainer_pod(jobset)["containers"]
    assert container["command"] == ["/bin/bash", "-c"]
    (script,) = container["args"]
    words = shlex.split(script.replace("\\\n", " "))
    # The entrypoint must be PID 1: it receives the kubelet's SIGTERM and keeps it from torchrun.
    assert words[:4] == ["exec", "python", "-m", "jobs.k8s.entrypoint"]
    return words[4:]


def _flag(words: list[str], name: str) -> str:
    values = [w.split("=", 1)[1] for w in words if w.startswith(f"{name}=")]
    if not values:
        values = [words[i + 1] for i, w in enumerate(words) if w == name]
    assert len(values) == 1, f"{name} appears {len(values)} times in {words}"
    return values[0]


VARIANTS = {
    "tcp-defaults": {},
    "tcp-everything": dict(queue="team-a", namespace="ml-research", image_pull_secrets=("regcred", "mirror"),
                           service_account="titan-trainer", s3_secret=None),
    "infiniband": dict(network="infiniband"),
    "infiniband-everything": dict(network="infiniband", queue="team-a", namespace="ml", service_account="sa",
                                  image_pull_secrets=("regcred",), rdma_resource="rdma/ib=4",
                                  nccl_env=("NCCL_IB_HCA=mlx5", "NCCL_DEBUG=INFO")),
    "efa": dict(network="efa", queue="team-a"),
    "efa-everything": dict(network="efa", namespace="ml", service_account="irsa", s3_secret=None,
                           image_pull_secrets=("ecr",), rdma_resource="vpc.amazonaws.com/efa=4"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_variant_validates(tmp_path, variant):
    options = dict(VARIANTS[variant])
    queue = options.pop("queue", None)
    out = tmp_path / "out"
    paths = render_run(write_config(tmp_path, "moe-ep2", expert_parallel_degree=2), 2, 2, IMAGE, out, queue,
                       **options)
    assert {p.name for p in paths} == EXPECTED_FILES
    for version in VERSIONS:
        checked, problems = validate_dir(out, crd_path(), version)
        assert (checked, problems) == (len(EXPECTED_FILES), []), version


def test_the_shared_render_validates(rendered):
    _, out, _ = rendered
    assert validate_dir(out, crd_path()) == (len(EXPECTED_FILES), [])


def test_validation_is_strict_and_catches_typos(rendered):
    """The checks must be able to fail: misspelled fields and bad enums are reported."""
    _, out, _ = rendered
    crd = crd_path()
    jobset = load(out / "jobset.yaml")

    typo = copy.deepcopy(jobset)
    typo["spec"]["failurePolicy"]["restartStratgy"] = typo["spec"]["failurePolicy"].pop("restartStrategy")
    assert [p.path for p in validate_object(typo, "j", crd)] == ["spec.failurePolicy"]

    bad_action = copy.deepcopy(jobset)
    bad_action["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartAndIgnore"
    assert [p.path for p in validate_object(bad_action, "j", crd)] == ["spec.failurePolicy.rules.0.action"]

    pod_typo = copy.deepcopy(jobset)
    trainer_pod(pod_typo)["containers"][0]["volumeMount"] = []
    problems = validate_object(pod_typo, "j", crd)
    assert problems and all("volumeMount" in p.message for p in problems)

    meta_typo = copy.deepcopy(jobset)
    meta_typo["metadata"]["label"] = {}
    assert [p.path for p in validate_object(meta_typo, "j", crd)] == ["metadata"]

    deployment = load(out / "tensorboard-deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["port"] = 6006
    assert len(validate_object(deployment, "d", crd)) == 1


def test_failure_policy_is_paired_with_the_pod_failure_policy(rendered):
    _, out, _ = rendered
    jobset = load(out / "jobset.yaml")
    policy = jobset["spec"]["failurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate"
    assert policy["maxRestarts"] == RenderOptions().max_restarts
    # The reason the Job controller sets when a podFailurePolicy FailJob rule fires; the crash loop
    # is told apart by the controller's message (tests/test_k8s_failures.py evaluates both policies).
    assert [(r["name"], r["action"], r["onJobFailureReasons"]) for r in policy["rules"]] == [
        ("CrashLoop", "FailJobSet", ["PodFailurePolicy"]),
        ("RestartWithoutCounting", "RestartJobSetAndIgnoreMaxRestarts", ["PodFailurePolicy"]),
    ]

    (rjob,) = jobset["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 4, 4)
    assert job["backoffLimit"] == 0
    assert job["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [77]}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # The entrypoint's preempted / peer lost / rank failed.
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75, 76, 78]}},
    ]
    # podFailurePolicy is only allowed (and only meaningful) with restartPolicy Never.
    assert job["template"]["spec"]["restartPolicy"] == "Never"


def test_dev_shm_is_memory_backed_and_sized(rendered, tmp_path):
    _, out, _ = rendered
    pod = trainer_pod(load(out / "jobset.yaml"))
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}  # 4Gi x 8 GPUs

    render_run(write_config(tmp_path), 1, 1, IMAGE, tmp_path / "a")
    assert trainer_pod(load(tmp_path / "a" / "jobset.yaml"))["volumes"][1]["emptyDir"]["sizeLimit"] == "8Gi"
    render_run(write_config(tmp_path), 1, 1, IMAGE, tmp_path / "b", shm_size="100Gi", memory="200Gi")
    assert trainer_pod(load(tmp_path / "b" / "jobset.yaml"))["volumes"][1]["emptyDir"]["sizeLimit"] == "100Gi"


def test_static_rendezvous_at_pod_zero_and_torchrun_shape(rendered):
    _, out, _ = rendered
    jobset = load(out / "jobset.yaml")
    name = jobset["metadata"]["name"]
    assert name == "moe-ep8"
    # The headless Service JobSet creates is the subdomain; pods are <jobset>-<rjob>-<job>-<index>.
    network = {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name}
    assert jobset["spec"]["network"] == network
    assert jobset["spec"]["replicatedJobs"][0]["name"] == "node"

    words = _script_words(jobset)
    # Static: node rank = completion index, and node rank 0 (pod index 0) hosts the store.
    assert _flag(words, "--rdzv_backend") == "static"
    assert _flag(words, "--master_addr") == "moe-ep8-node-0-0.moe-ep8"
    assert _flag(words, "--master_port") == "29500"
    assert _flag(words, "--node_rank") == "${JOB_COMPLETION_INDEX}"
    assert _flag(words, "--rdzv_conf") == "timeout=900"  # the non-zero ranks retry the store this long
    assert _flag(words, "--max_restarts") == "0"  # restarts are the JobSet's
    assert _flag(words, "--nnodes") == "4"
    assert _flag(words, "--nproc_per_node") == "8"
    assert _flag(words, "-m") == "jobs.k8s.worker"  # runs the trainer, telling a lost peer from a failure
    assert words[words.index("jobs.k8s.worker") + 1] == "titan_moe.train"
    assert _flag(words, "--job.config_file") == "/config/run.toml"

    (container,) = trainer_pod(jobset)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"


def test_long_config_names_become_valid_distinct_hostnames():
    stem = "sweep-flopmatched-n64-g0.125-k8-generalist-0.5-aux0.01-zloss0.001-seed17"
    a = name_from_stem(stem, 16)
    b = name_from_stem(stem.replace("seed17", "seed18"), 16)
    assert a != b and a == name_from_stem(stem, 16)  # distinct, stable
    for name in (a, b):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
        assert len(f"{name}-node-0-15") <= 63 and len(f"{name}-tensorboard") <= 63
    assert max_name_length(16) == 63 - len("-tensorboard")
    assert max_name_length(10**9) == 63 - len("-node-0-999999999")
    assert name_from_stem("7B_MoE v2", 4) == "run-7b-moe-v2"


def test_checkpoints_tensorboard_and_eval_share_the_run_folder(rendered):
    config, out, _ = rendered
    jobset = load(out / "jobset.yaml")
    words = _script_words(jobset)
    assert _flag(words, "--job.dump_folder") == "/runs/moe-ep8"
    assert "--checkpoint.enable" in words and "--metrics.enable_tensorboard" in words
    assert _flag(words, "--checkpoint.folder") == "checkpoint"
    assert _flag(words, "--data.local_cache") == "/data-cache"
    pod = trainer_pod(jobset)
    (cache,) = [v for v in pod["volumes"] if v["name"] == "data-cache"]
    assert cache["emptyDir"] == {"sizeLimit": "100Gi"}
    assert _flag(words, "--data.cache_limit") == f"{int(100 * 1024 * 0.9)}mb"  # 90% of the emptyDir
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert claims[mounts["/runs"]] == "titan-moe-runs"
    assert pod["volumes"][[v["name"] for v in pod["volumes"]].index(mounts["/config"])]["configMap"] == {
        "name": "moe-ep8-config"
    }

    tb = load(out / "tensorboard-deployment.yaml")["spec"]["template"]["spec"]
    assert "--logdir=/runs/moe-ep8/tb" in tb["containers"][0]["command"]
    assert tb["volumes"][0]["persistentVolumeClaim"] == {"claimName": "titan-moe-runs", "readOnly": True}
    service = load(out / "tensorboard-service.yaml")
    deployment = load(out / "tensorboard-deployment.yaml")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert set(service["spec"]["selector"].items()) <= set(deployment["spec"]["template"]["metadata"]["labels"].items())

    eval_job = load(out / "eval-job.yaml")
    command = eval_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["titan-moe", "eval"]
    # The eval Job's command is one the real `titan-moe eval` accepts.
    args = build_eval_parser().parse_args(command[2:])
    assert args.checkpoint == "/runs/moe-ep8/checkpoint"
    assert args.config == "/config/run.toml"
    assert str(args.tb_dir) == "/runs/moe-ep8/tb/eval" and str(args.out) == "/runs/moe-ep8/eval/results.json"
    assert str(args.data_root) == "/runs/eval-data" and args.nproc == 1


def test_credentials_come_from_the_secret_and_config_from_the_configmap(rendered):
    config, out, _ = rendered
    for file in ("jobset.yaml", "eval-job.yaml"):
        obj = load(out / file)
        pod = trainer_pod(obj) if obj["kind"] == "JobSet" else obj["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "S3_ENDPOINT_URL"):
            assert "value" not in env[key], f"{key} must not be a literal in {file}"
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "titan-moe-s3"
            assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
        assert env["S3_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True  # temporary keys only
        assert "optional" not in env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]

    cm = load(out / "configmap.yaml")
    assert cm["data"]["run.toml"] == config.read_text()  # verbatim, through the YAML block style
    assert tomllib.loads(cm["data"]["run.toml"])["parallelism"]["expert_parallel_degree"] == 8


def test_kueue_label_only_when_a_queue_is_given(rendered, tmp_path):
    _, out, _ = rendered
    assert load(out / "jobset.yaml")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert load(out / "eval-job.yaml")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    render_run(write_config(tmp_path), 1, 1, IMAGE, tmp_path / "noq")
    assert "kueue.x-k8s.io/queue-name" not in load(tmp_path / "noq" / "jobset.yaml")["metadata"]["labels"]


def test_kustomization_applies_training_objects_not_the_eval_job(rendered):
    _, out, _ = rendered
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "titan-moe"
    assert set(kustomization["resources"]) == EXPECTED_FILES - {"eval-job.yaml", "kustomization.yaml"}


def test_cli_render_then_validate(tmp_path, capsys):
    config = write_config(tmp_path, "cli-run")
    out = tmp_path / "out"
    argv = ["render", str(config), "--nodes", "2", "--gpus-per-node", "2", "--image", IMAGE, "--out", str(out)]
    assert k8s_main(argv + ["--queue", "q1", "--max-restarts", "5"]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    jobset = load(out / "jobset.yaml")
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 5
    assert _flag(_script_words(jobset), "--master_addr") == "cli-run-node-0-0.cli-run"
    assert k8s_main(["validate", str(out)]) == 0  # the repository's pinned CRDs
    assert "6 objects checked, 0 problems" in capsys.readouterr().out


def test_cluster_setup_manifests_validate():
    cluster = REPO / "k8s" / "cluster"
    kustomization = yaml.safe_load((cluster / "kustomization.yaml").read_text())
    for res in kustomization["resources"]:
        assert validate_object(load(cluster / res), res, crd_path()) == []
    pvc = load(cluster / "runs-pvc.yaml")
    assert pvc["metadata"]["name"] == RenderOptions().runs_claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # node pods + TensorBoard on different nodes
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == RenderOptions().s3_secret
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    # Rendering without --namespace targets the namespace this setup creates (and enforces "restricted" in).
    namespace = load(cluster / "namespace.yaml")
    assert kustomization["namespace"] == namespace["metadata"]["name"] == RenderOptions().namespace
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The pod that puts eval data onto the volume passes the same rules as the rendered ones.
    volume_pod = load(cluster / "volume-pod.yaml")
    assert validate_object(volume_pod, "volume-pod.yaml", crd_path()) == []
    assert restricted_violations(volume_pod["spec"]) == [] and qos_class(volume_pod["spec"]) == "Guaranteed"
    assert volume_pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_kueue_example_validates_and_feeds_the_rendered_queue(tmp_path):
    kueue = REPO / "k8s" / "cluster" / "kueue"
    assert validate_dir(kueue, crd_path()) == (4, [])
    flavor, cq, lq = (load(kueue / f) for f in ("resource-flavor.yaml", "cluster-queue.yaml", "local-queue.yaml"))
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"]
    assert lq["metadata"]["namespace"] == RenderOptions().namespace
    (group,) = cq["spec"]["resourceGroups"]
    assert [f["name"] for f in group["flavors"]] == [flavor["metadata"]["name"]]
    # Kueue admits a workload only if every resource its pods request is covered.
    render_run(write_config(tmp_path), 1, 2, IMAGE, tmp_path / "q", lq["metadata"]["name"])
    requests = trainer_pod(load(tmp_path / "q" / "jobset.yaml"))["containers"][0]["resources"]["requests"]
    assert set(requests) <= set(group["coveredResources"])
    # The Kueue schemas are strict too.
    typo = dict(cq, spec={**cq["spec"], "namespaceSelecter": {}})
    assert [p.path for p in validate_object(typo, "cq", crd_path())] == ["spec"]


def test_pinned_crds_are_the_documented_releases():
    readme = (REPO / "k8s" / "README.md").read_text()
    crds = {p.name for p in (REPO / "k8s" / "crds").glob("*.yaml")}
    assert crds == {"jobset.x-k8s.io_jobsets.yaml", "kueue.x-k8s.io_resourceflavors.yaml",
                    "kueue.x-k8s.io_clusterqueues.yaml", "kueue.x-k8s.io_localqueues.yaml"}
    assert "JOBSET_VERSION=v0.12.0" in readme and "KUEUE_VERSION=v0.19.2" in readme
    assert "vX.Y.Z" not in readme


def test_dockerfile_base_matches_the_locked_torch():
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    versions = {p["name"]: p["version"] for p in lock["package"]}
    match = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\S+)-cuda(\d+\.\d+)-cudnn\d+-runtime$", dockerfile, re.M)
    assert match, "the base must be an official pytorch/pytorch CUDA runtime tag"
    torch_version, cuda = match.groups()
    assert torch_version == versions["torch"]
    assert versions["nvidia-cuda-runtime"].startswith(cuda.split(".")[0] + ".")  # CUDA 13 wheels in the lock
    assert "uv sync --frozen --no-dev" in dockerfile
    # Never root at run time, and the uid the pods' securityContext expects.
    from jobs.k8s.podspec import RUN_AS_UID

    (user,) = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user == f"{RUN_AS_UID}:{RUN_AS_UID}"
    # One build argument per --network choice, and the image says what it was built with.
    assert re.search(r"^ARG NETWORK=tcp$", dockerfile, re.M)
    for network in ("infiniband", "efa"):
        assert f"      {network}) \\" in dockerfile
    assert "rdma-core" in dockerfile and "efa_installer.sh" in dockerfile
    assert "TITAN_MOE_IMAGE_NETWORK=${NETWORK}" in dockerfile
    # The build context is an allow-list of the installable packages: no tests, data, outputs or secrets.
    rules = [line for line in (REPO / "k8s" / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "uv.lock", "README.md", "titan_moe/", "data_prep/", "eval/", "jobs/"}


def test_render_overrides_reach_trainer_and_eval_job(tmp_path):
    """`k8s render RUN.toml ... -- --section.key value`: checked at render time, then passed on."""
    out = tmp_path / "o"
    render_run(write_config(tmp_path), 1, 2, IMAGE, out, overrides=["--training.steps", "7"])
    words = _script_words(load(out / "jobset.yaml"))
    config_at = words.index("--job.config_file")
    assert words[config_at + 2: config_at + 4] == ["--training.steps", "7"]
    # The renderer's cluster settings come after the user's, so they win.
    assert words.index("--job.dump_folder") > config_at + 3
    (container,) = load(out / "eval-job.yaml")["spec"]["template"]["spec"]["containers"]
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[-3:] == ["--", "--training.steps", "7"]
    with pytest.raises(ConfigError) as err:  # a bad override fails the render, naming the flag
        render_run(write_config(tmp_path), 1, 2, IMAGE, tmp_path / "bad", overrides=["--training.stepz", "7"])
    assert err.value.field == "RUN.toml" and "stepz" in str(err.value)
    assert not (tmp_path / "bad").exists()

"""`titan-moe k8s render-prep`: an Indexed Job of prep shards plus a finalize Job, valid and runnable."""

from __future__ import annotations

import pytest

from data_prep.cli import build_parser as build_prep_parser
from jobs.k8s.cli import main as k8s_main
from jobs.k8s.prep import FINALIZE_FILE, SHARDS_FILE, PrepSpec, build
from jobs.k8s.options import RenderOptions
from jobs.k8s.validate import KUBERNETES_VERSION, validate_dir
from titan_moe.common.errors import ConfigError
from tests.k8s_support import IMAGE, crd_path, load

# What k8s/README.md documents for this render (the prep flags are data_prep/cli.py's).
DOCUMENTED = [
    "titan-moe", "prep", "s3://corpus/olmoe-mix", "s3://data/mds",
    "--tokenizer", "allenai/OLMoE-1B-7B-0924", "--seq-len", "4096", "--sources", "wiki,arxiv",
    "--workers", "16", "--work-dir", "s3://data/_work", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    argv = ["render-prep", "s3://corpus/olmoe-mix", "s3://data/mds", "--shards", "12", "--parallelism", "4",
            "--image", IMAGE, "--out", str(out), "--tokenizer", "allenai/OLMoE-1B-7B-0924", "--seq-len", "4096",
            "--sources", "wiki,arxiv", "--work-dir", "s3://data/_work", "--cpu", "16", "--memory", "64Gi",
            "--queue", "team-a", "--service-account", "prep-irsa", "--s3-secret", "none"]
    assert k8s_main(argv) == 0
    return out


def test_rendered_prep_jobs_validate(rendered):
    for version in ("1.31.0", KUBERNETES_VERSION, "1.37.0"):
        assert validate_dir(rendered, crd_path(), version) == (2, []), version


def test_shards_are_an_indexed_job_with_per_index_retries(rendered):
    job = load(rendered / SHARDS_FILE)
    assert job["metadata"]["name"] == "prep-shards" and job["metadata"]["namespace"] == "titan-moe"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 12, 4)
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (2, 0)
    # A preempted shard is retried without using up its retries.
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "prep-irsa"
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # Kubernetes sets JOB_COMPLETION_INDEX on Indexed Job pods; the count comes from the manifest.
    assert env["JOB_COMPLETIONS"] == "12"
    assert "AWS_ACCESS_KEY_ID" not in env  # --s3-secret none: workload identity
    assert container["resources"]["limits"] == {"cpu": "16", "memory": "64Gi"}


def test_commands_are_the_documented_prep_cli(rendered):
    shards = load(rendered / SHARDS_FILE)["spec"]["template"]["spec"]["containers"][0]["command"]
    finalize_job = load(rendered / FINALIZE_FILE)
    finalize = finalize_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert shards == DOCUMENTED  # --workers follows --cpu: os.cpu_count() would see the whole node
    assert finalize == [*DOCUMENTED, "--finalize"]
    assert "completionMode" not in finalize_job["spec"]
    # The real prep parser accepts the shard command and reads what was meant.
    args = build_prep_parser().parse_args(shards[2:])
    assert (args.input_root, args.output, args.seq_len, args.workers) == ("s3://corpus/olmoe-mix", "s3://data/mds",
                                                                         4096, 16)
    assert (args.sources, args.work_dir, args.no_progress) == ("wiki,arxiv", "s3://data/_work", True)
    assert not args.finalize and args.shard is None  # the shard comes from the Indexed Job's variables
    assert build_prep_parser().parse_args(finalize[2:]).finalize


def test_bad_prep_inputs():
    options = RenderOptions()
    with pytest.raises(ConfigError, match="--shards: must be a positive integer, got 0"):
        build(PrepSpec("s3://in", "s3://out", shards=0), IMAGE, options)
    with pytest.raises(ConfigError, match="is too long: with 1000 shards use at most 52"):
        build(PrepSpec("s3://in", "s3://out", shards=1000, name="p" * 60), IMAGE, options)
    with pytest.raises(ConfigError, match="--image: no container image given"):
        build(PrepSpec("s3://in", "s3://out", shards=2), None, options)
    with pytest.raises(ConfigError, match="--cpu"):
        build(PrepSpec("s3://in", "s3://out", shards=2, cpu="lots"), IMAGE, options)
    assert PrepSpec("s3://in", "s3://out", shards=2, cpu="2500m").pod_workers == 2

"""Runs that cannot work on the requested cluster fail at render time, naming the field -- and write nothing."""

from __future__ import annotations

import pytest

from jobs.k8s import render_run
from jobs.k8s.cli import main as k8s_main
from titan_moe.common.errors import ConfigError
from tests.k8s_support import IMAGE, REPO, write_config


def _render_error(tmp_path, config, nodes=2, gpus=4, image=IMAGE, **options) -> ConfigError:
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        render_run(config, nodes, gpus, image, out, **options)
    assert not out.exists(), "a failed render must not create or half-write the output directory"
    return info.value


def test_mesh_that_does_not_tile_the_cluster(tmp_path):
    # dp_shard 3 on 2 nodes x 4 GPUs = 8 ranks.
    err = _render_error(tmp_path, write_config(tmp_path, data_parallel_shard_degree=3))
    assert err.field == "parallelism.data_parallel_shard_degree"
    assert "3 ranks, but the world size is 8" in str(err)
    assert "--nodes 2 x --gpus-per-node 4 = 8 ranks" in str(err)


def test_replicate_degree_that_does_not_divide_the_cluster(tmp_path):
    err = _render_error(tmp_path, write_config(tmp_path, data_parallel_replicate_degree=3), nodes=2, gpus=2)
    assert err.field == "parallelism.data_parallel_replicate_degree"
    assert "does not divide the world size 4" in str(err)


def test_expert_parallel_degree_that_does_not_fit(tmp_path):
    # EP 8 borrows 8 ranks of the FSDP dimension: 2 x 2 = 4 ranks are too few.
    err = _render_error(tmp_path, write_config(tmp_path, expert_parallel_degree=8), nodes=2, gpus=2)
    assert err.field == "parallelism.expert_parallel_degree"
    assert "must divide data_parallel_shard_degree 4" in str(err)
    # 6 experts cannot be split over EP 4 (the mesh itself would fit 8 ranks).
    err = _render_error(tmp_path, write_config(tmp_path, num_experts=6, expert_parallel_degree=4), nodes=2, gpus=4)
    assert err.field == "moe.expert_sets[0].num_experts"
    assert "6 experts cannot be split evenly over expert_parallel_degree 4" in str(err)
    # Expert parallelism for a dense model.
    err = _render_error(tmp_path, write_config(tmp_path, moe=False, expert_parallel_degree=2))
    assert err.field == "parallelism.expert_parallel_degree"


@pytest.mark.parametrize("image", [None, "", "   "])
def test_missing_image(tmp_path, image):
    err = _render_error(tmp_path, write_config(tmp_path), image=image)
    assert err.field == "--image"
    assert "no container image given" in str(err) and "k8s/Dockerfile" in str(err)


@pytest.mark.parametrize("image", ["Registry.example.com/Team/titan-moe:1", "titan moe:1", "https://ghcr.io/x/y:1"])
def test_malformed_image(tmp_path, image):
    err = _render_error(tmp_path, write_config(tmp_path), image=image)
    assert err.field == "--image" and "not a container image reference" in str(err)


@pytest.mark.parametrize(("nodes", "gpus", "field"), [(0, 4, "--nodes"), (-2, 4, "--nodes"), (2, 0, "--gpus-per-node"),
                                                      (None, 4, "--nodes"), (1.5, 4, "--nodes")])
def test_non_positive_cluster_shape(tmp_path, nodes, gpus, field):
    err = _render_error(tmp_path, write_config(tmp_path), nodes=nodes, gpus=gpus)
    assert err.field == field and "must be a positive integer" in str(err)


def test_bad_names_and_options(tmp_path):
    config = write_config(tmp_path)
    err = _render_error(tmp_path, config, name="My_Run")
    assert err.field == "--name" and "DNS-1035" in str(err)
    err = _render_error(tmp_path, config, name="r" * 60, nodes=16, gpus=8)
    assert err.field == "--name" and "use at most 51" in str(err)
    assert _render_error(tmp_path, config, queue="Team A").field == "--queue"
    assert _render_error(tmp_path, config, shm_size="lots").field == "--shm-size"
    assert _render_error(tmp_path, config, checkpoint_seconds=0).field == "--checkpoint-seconds"
    assert _render_error(tmp_path, config, runs_mount="runs").field == "--runs-mount"
    err = _render_error(tmp_path, config, eval_data="/mnt/eval")
    assert err.field == "--eval-data" and "must lie on the run volume (under /runs/)" in str(err)


def test_bad_config_files(tmp_path):
    err = _render_error(tmp_path, tmp_path / "missing.toml")
    assert err.field == "RUN.toml" and "does not exist" in str(err)
    broken = tmp_path / "broken.toml"
    broken.write_text("[training\nsteps = 1\n")
    err = _render_error(tmp_path, broken)
    assert err.field == "RUN.toml" and "not valid TOML" in str(err)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(write_config(tmp_path).read_text() + "stepz = 3\n")  # lands in [parallelism]
    err = _render_error(tmp_path, unknown)
    assert err.field == "RUN.toml" and "stepz" in str(err)
    escaping = write_config(tmp_path, "abs", checkpoint='folder = "/mnt/elsewhere"')
    err = _render_error(tmp_path, escaping)
    assert err.field == "checkpoint.folder" and "relative to [job].dump_folder" in str(err)


def test_failed_render_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "out"
    render_run(write_config(tmp_path, "good"), 1, 1, IMAGE, out)
    before = {p.name: p.read_text() for p in out.iterdir()}
    with pytest.raises(ConfigError):
        render_run(write_config(tmp_path, "good", data_parallel_shard_degree=3), 1, 1, IMAGE, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == before


def test_cli_reports_the_error_and_exits_2(tmp_path, capsys):
    config = write_config(tmp_path)
    code = k8s_main(["render", str(config), "--nodes", "0", "--gpus-per-node", "8", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--nodes: must be a positive integer, got 0" in err
    code = k8s_main(["render", str(config), "--nodes", "1", "--gpus-per-node", "8", "--out", str(tmp_path / "o")])
    assert code == 2 and "--image: no container image given" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_config_without_dataset_names_the_field_not_the_cluster(tmp_path):
    # The shipped example has no [training].dataset: torchtitan's default 'c4_test' is not ours.
    # Whatever the config layer defaults it to, the error (if any) must not blame the cluster shape.
    config = REPO / "titan_moe" / "configs" / "olmoe_like_small.toml"
    try:
        render_run(config, 1, 8, IMAGE, tmp_path / "out")
    except ConfigError as err:
        assert err.field == "training.dataset"
        assert "'synthetic' or 'mds'" in str(err)
        assert "--nodes" not in str(err) and "cluster shape" not in str(err)
    # A mesh error still says which cluster it was checked against.
    err = _render_error(tmp_path, write_config(tmp_path, data_parallel_shard_degree=3))
    assert "change the run config or the cluster shape" in str(err)
    dataset = write_config(tmp_path, "ds")
    dataset.write_text(dataset.read_text().replace('dataset = "synthetic"', 'dataset = "c4"'))
    err = _render_error(tmp_path, dataset)
    assert err.field == "training.dataset" and "cluster shape" not in str(err) and "'synthetic' or 'mds'" in str(err)


def test_bad_cluster_options(tmp_path):
    config = write_config(tmp_path)
    err = _render_error(tmp_path, config, network="roce")
    assert err.field == "--network" and "tcp, infiniband, efa" in str(err)
    err = _render_error(tmp_path, config, rdma_resource="rdma/ib=1")
    assert err.field == "--rdma-resource" and "needs --network infiniband or efa" in str(err)
    err = _render_error(tmp_path, config, network="efa", rdma_resource="vpc.amazonaws.com/efa")
    assert err.field == "--rdma-resource" and "RESOURCE=COUNT" in str(err)
    err = _render_error(tmp_path, config, nccl_env=("NCCL_DEBUG",))
    assert err.field == "--nccl-env" and "KEY=VALUE" in str(err)
    err = _render_error(tmp_path, config, gpus=1, shm_size="64Gi")  # 1 GPU: 64Gi of memory by default
    assert err.field == "--shm-size" and "counts against the pod's memory (64Gi)" in str(err)
    assert _render_error(tmp_path, config, memory="8Gi").field == "--memory"  # /dev/shm 16Gi for 4 GPUs
    assert _render_error(tmp_path, config, data_cache_size="0").field == "--data-cache-size"
    assert _render_error(tmp_path, config, step_seconds=0).field == "--step-seconds"
    assert _render_error(tmp_path, config, service_account="Bad_SA").field == "--service-account"
    assert _render_error(tmp_path, config, image_pull_secrets=("ok", "not ok")).field == "--image-pull-secret"
    assert _render_error(tmp_path, config, namespace="Team").field == "--namespace"


def test_validate_never_passes_on_nothing(tmp_path, capsys):
    assert k8s_main(["validate", str(tmp_path)]) == 1
    assert f"no manifests (*.yaml) in {tmp_path}" in capsys.readouterr().err
    (tmp_path / "lq.yaml").write_text((REPO / "k8s" / "cluster" / "kueue" / "local-queue.yaml").read_text())
    assert k8s_main(["validate", str(tmp_path), "--crd-dir", str(tmp_path / "none")]) == 2
    assert "no CustomResourceDefinition in" in capsys.readouterr().err

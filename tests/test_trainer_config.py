"""Run-config parsing, preflight checks (before any process group) and the local launcher."""

import glob
import tomllib

import pytest

from titan_moe import launch
from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import parse_run_config
from titan_moe.model.args import TitanMoEModelArgs
from titan_moe.run_config.preflight import model_args_from_config, plan_run
from tests.distributed_utils import CONFIGS, config


def parse(name: str, *overrides: str):
    return parse_run_config(["--job.config_file", config(name), *overrides])


@pytest.mark.parametrize("path", sorted(glob.glob(str(CONFIGS / "*.toml"))))
def test_parsed_config_and_plain_tables_build_the_same_model(path):
    """The reader (train, describe, eval, ...) and the sweep planner's plain [arch]/[moe] tables agree."""
    job = parse_run_config(["--job.config_file", path])
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    seq_len = doc.get("training", {}).get("seq_len", 2048)
    assert model_args_from_config(job) == TitanMoEModelArgs.from_sections(doc["arch"], doc.get("moe"), seq_len)


def test_toml_numbers_and_cli_overrides_reach_expert_sets(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text(
        open(config("tiny_moe_hetero")).read()
        .replace('granularity = "1/8"', "granularity = 0.125")
        .replace('generalist_granularity = "1/4"', "generalist_granularity = 0.25")
    )
    job = parse_run_config(["--job.config_file", str(run), "--moe.expert_sets.1.top_k", "3",
                            "--moe.no-require-flop-match"])
    args = model_args_from_config(job)
    assert [(s.num_experts, str(s.granularity), s.top_k) for s in args.moe.expert_sets] == [(4, "1/2", 1), (8, "1/8", 3)]
    assert str(args.moe.generalist_granularity) == "1/4"


def test_valid_dp2ep_mesh():
    plan = plan_run(parse("tiny_moe_hetero", "--parallelism.expert_parallel_degree", "2"), world_size=2)
    args, mesh = plan.model_args, plan.mesh
    assert (mesh.dp_shard, mesh.ep, mesh.efsdp, mesh.dp) == (2, 2, 1, 2)
    assert [s.num_experts for s in args.moe.expert_sets] == [4, 8]


@pytest.mark.parametrize(
    "name,overrides,world,field,text",
    [
        # 4 and 6 experts over EP 4: the second set is the one named.
        ("tiny_moe_hetero", ["--parallelism.expert_parallel_degree", "4", "--moe.expert_sets.1.num_experts", "6"], 4,
         "moe.expert_sets[1].num_experts", "6 experts cannot be split evenly over expert_parallel_degree 4"),
        ("tiny_moe", ["--parallelism.data_parallel_shard_degree", "4"], 2,
         "parallelism.data_parallel_shard_degree", "= 4 ranks, but the world size is 2"),
        ("tiny_moe", ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"], 3,
         "parallelism.data_parallel_shard_degree", "but the world size is 3"),
        ("tiny_moe", ["--parallelism.expert_parallel_degree", "4"], 6,
         "parallelism.expert_parallel_degree", "4 must divide data_parallel_shard_degree 6"),
        ("tiny_dense", ["--parallelism.expert_parallel_degree", "2"], 2,
         "parallelism.expert_parallel_degree", "[moe] is not enabled"),
        ("tiny_moe", ["--parallelism.tensor_parallel_degree", "2"], 2,
         "parallelism.tensor_parallel_degree", "set tensor_parallel_degree = 1"),
        ("tiny_moe", ["--training.global_batch_size", "12"], 2,
         "training.global_batch_size", "12 is not a multiple of local_batch_size 4 x data-parallel degree 2 = 8"),
        ("tiny_moe", ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"], 2,
         "parallelism.data_parallel_shard_degree", "(pure DDP)"),
        ("tiny_moe", ["--training.dataset", "c4"], 1, "training.dataset", "unknown dataset 'c4'"),
        ("tiny_moe", ["--model.name", "llama3"], 1, "model.name", "got 'llama3'"),
        ("tiny_moe", ["--moe.expert_sets.0.top_k", "9", "--moe.no-require-flop-match"], 1,
         "moe.expert_sets[0].top_k", "top_k 9 exceeds num_experts 8"),
        # [checkpoint] and [profiling]: torchtitan and the checkpoint manager would only find
        # these after the process group is up (an AssertionError on every rank).
        ("tiny_moe", ["--checkpoint.enable", "--checkpoint.keep_latest_k", "1"], 1,
         "checkpoint.keep_latest_k", "must be 0 (keep all) or >= 2"),
        ("tiny_moe", ["--checkpoint.enable", "--checkpoint.interval", "0"], 1, "checkpoint.interval", "must be > 0"),
        ("tiny_moe", ["--checkpoint.enable", "--checkpoint.load_step", "-2"], 1,
         "checkpoint.load_step", "is -2; use -1 (the newest) or a step"),
        ("tiny_moe", ["--profiling.enable_profiling", "--profiling.profile_freq", "2"], 1,
         "profiling.profile_freq", "is 2, shorter than profiler_warmup 3 + profiler_active 1 = 4; use profile_freq >= 4"),
        ("tiny_moe", ["--profiling.enable_memory_snapshot", "--profiling.profile_freq", "0"], 1,
         "profiling.profile_freq", "profile every N >= 1 steps"),
    ],
)
def test_preflight_rejects_with_the_field_named(name, overrides, world, field, text):
    with pytest.raises(ConfigError) as err:
        plan_run(parse(name, *overrides), world_size=world)
    assert err.value.field == field
    assert text in str(err.value)


def test_launcher_rejects_before_spawning(capsys):
    status = launch.main([config("tiny_moe_hetero"), "--nproc", "2", "--parallelism.expert_parallel_degree", "2",
                          "--moe.expert_sets.0.num_experts", "3"])
    assert status == 2
    err = capsys.readouterr().err
    assert "moe.expert_sets[0].num_experts: 3 experts cannot be split evenly over expert_parallel_degree 2" in err


def test_launcher_rejects_a_bad_profiling_schedule_before_spawning(capsys, monkeypatch):
    def no_torchrun(*args, **kwargs):
        raise AssertionError("torchrun was started for a run config preflight must refuse")

    monkeypatch.setattr(launch.subprocess, "call", no_torchrun)
    monkeypatch.setattr(launch.subprocess, "run", no_torchrun)
    status = launch.main([config("tiny_moe"), "--nproc", "1", "--profiling.enable_profiling",
                          "--profiling.profile_freq", "2"])
    assert status == 2
    assert "profiling.profile_freq: is 2, shorter than profiler_warmup 3" in capsys.readouterr().err


def test_a_rank_reuses_the_plan_preflight_made(monkeypatch):
    """Model args are built once per process: torchtitan's hook gets the planned object."""
    from titan_moe.trainer import train_spec

    job = parse("tiny_moe")
    plan = plan_run(job, world_size=1)

    def rebuilt(*args, **kwargs):
        raise AssertionError("model args were built a second time")

    monkeypatch.setattr(TitanMoEModelArgs, "from_job_config", rebuilt)
    run_args = train_spec.RunModelArgs()
    run_args.update_from_config(job)
    assert run_args.args is plan.model_args


def test_launcher_rejects_missing_file(capsys, tmp_path):
    assert launch.main([str(tmp_path / "nope.toml"), "--nproc", "1"]) == 2
    assert "no such run config file" in capsys.readouterr().err


def test_launcher_dry_run_prints_torchrun_command(capsys):
    status = launch.main([config("tiny_moe"), "--nproc", "2", "--dry-run", "--training.steps", "7"])
    assert status == 0
    cmd = capsys.readouterr().out.strip()
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=0 --local-ranks-filter 0" in cmd
    assert cmd.endswith(f"-m titan_moe.train --job.config_file {config('tiny_moe')} --training.steps 7")


def test_launcher_shares_cores_between_processes():
    env = launch.build_env(2, environ={})
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert launch.build_env(2, environ={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    assert "--local-ranks-filter" not in launch.build_command("run.toml", 2, [], log_all_ranks=True)

"""One reader for every command: the same TOML plus the same overrides parse to the same config.

Each command's entry (train's launcher, describe, eval, bench, k8s render, the
sweep planner) is driven through its own argument handling, so a command that
forgot the overrides, read its own defaults or mangled ``--`` would differ.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from eval import cli as eval_cli
from eval.checkpoint import TrainedRunConfig
from jobs.k8s import cli as k8s_cli
from jobs.sweep.plan import build_plan, write_plan
from jobs.sweep.spec_file import load_spec
from tests.distributed_utils import config
from tests.mds_streams import write_prep_output
from tests.sweep_support import SPECS
from titan_moe import bench, describe, launch
from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import load_run_config, parse_run_config
from titan_moe.model.accounting import describe as describe_model
from titan_moe.model.args import TitanMoEModelArgs
from titan_moe.run_config.preflight import plan_run

OVERRIDES = ["--moe.expert_sets.0.top_k", "2", "--moe.no-require-flop-match", "--training.steps", "5",
             "--moe.capacity_policy", "megablocks", "--job.dump_folder", "outputs/reader-test"]


def _check_overrides_applied(job) -> None:
    # Not just equal: equal *and* the overrides reached the fields (and the defaults are the schema's).
    assert job.moe.expert_sets[0].top_k == 2 and job.training.steps == 5
    assert job.moe.capacity_policy == "megablocks" and job.job.dump_folder == "outputs/reader-test"
    assert job.moe.expert_sets[0].granularity == "1/4" and job.moe.renormalize is False
    assert job.training.dataset == "synthetic" and job.metrics.enable_tensorboard is True


@pytest.mark.parametrize("separator", [[], ["--"]], ids=["mixed", "after --"])
def test_every_command_parses_the_same_config(separator):
    path = config("tiny_moe")
    reference = load_run_config(path, OVERRIDES)
    _check_overrides_applied(reference)
    entries = {
        "train": launch.read_config([path, "--nproc", "2", *separator, *OVERRIDES]),
        "describe": describe.read_config([path, "--json", *separator, *OVERRIDES]),
        "eval": eval_cli.read_config(["--config", path, "--tasks", "boolq", *separator, *OVERRIDES]),
        "k8s render": k8s_cli.read_config(["render", path, "--nodes", "1", "--gpus-per-node", "2",
                                           "--image", "registry.example.com/titan-moe:1", "--out", "unused",
                                           *separator, *OVERRIDES]),
    }
    for name, job in entries.items():
        assert job == reference, name
    assert TitanMoEModelArgs.from_job_config(entries["describe"]).moe.expert_sets[0].top_k == 2


def test_bench_run_parses_as_train_with_bench_settings(tmp_path):
    path = config("tiny_moe")
    out = tmp_path / "bench"
    job = bench.read_config([path, "--steps", "3", "--out", str(out), "--", *OVERRIDES[:3]])
    # The titan_moe half of a bench is `titan-moe train` with bench's settings before the user's.
    same = launch.read_config([path, "--", *bench.bench_overrides(3, out / "titan_moe"), *OVERRIDES[:3]])
    assert job == same
    assert (job.training.steps, job.metrics.log_freq, job.checkpoint.enable) == (3, 1, False)
    assert job.moe.expert_sets[0].top_k == 2


def test_sweep_points_parse_to_the_model_the_planner_counted(tmp_path):
    out = tmp_path / "mini"
    plan = build_plan(load_spec(SPECS / "mini.yaml"), out)
    write_plan(plan, out)
    for point in plan.points:
        row = point.row
        doc = tomllib.loads((out / row["config"]).read_text())
        planned = TitanMoEModelArgs.from_sections(doc["arch"], doc.get("moe"), doc["training"]["seq_len"])
        read = TitanMoEModelArgs.from_job_config(launch.read_config([str(out / row["config"])]))
        assert read == planned, row["name"]
        assert describe_model(read)["flops_per_token"] == row["flops_per_token"]


def test_describe_takes_overrides(capsys):
    path = config("tiny_moe")
    assert describe.main([path, "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert describe.main([path, "--json", "--", "--moe.expert_sets.0.top_k", "2", "--moe.no-require-flop-match"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert [s["top_k"] for s in (before["expert_sets"][0], after["expert_sets"][0])] == [4, 2]
    # Experts of dim 64 x hidden 32 (SwiGLU: 3 matrices); two fewer active per token per layer, 2 layers.
    assert before["active_params"] - after["active_params"] == 2 * 2 * 3 * 64 * 32
    assert not after["flop_matched"]


def test_eval_reads_the_trainers_defaults(tmp_path):
    """eval used to assume TensorBoard on when [metrics] did not say; torchtitan's default is off."""
    text = open(config("tiny_moe")).read().replace("enable_tensorboard = true", "")
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert load_run_config(path).metrics.enable_tensorboard is False
    assert TrainedRunConfig.load(path).tensorboard_dir is None
    on = TrainedRunConfig.load(path, ["--metrics.enable_tensorboard"])
    assert on.tensorboard_dir == on.dump_folder / "tb" / "eval"


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_run_config(tmp_path / "missing.toml")
    assert err.value.field == "config" and "no such run config file" in str(err.value)
    typo = tmp_path / "typo.toml"
    typo.write_text(open(config("tiny_moe")).read().replace("top_k = 4", "top_k = 4, topk = 1"))
    with pytest.raises(ConfigError) as err:
        load_run_config(typo)
    assert err.value.field == "moe.expert_sets[0].topk" and "unknown key" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_run_config(config("tiny_moe"), ["--trainig.steps", "3"])
    assert err.value.field == "overrides" and "trainig" in str(err.value)
    with pytest.raises(ConfigError) as err:
        launch.read_config([config("tiny_moe"), "--nprocs", "2"])  # a launcher flag typo, not an override
    assert err.value.field == "--nprocs" and "is not an option of this command" in str(err.value)


# -- `--` ------------------------------------------------------------------------


def test_train_passes_what_follows_the_separator_to_the_trainer(capsys):
    path = config("tiny_dense")
    args, overrides = launch.parse_command_line([path, "--nproc", "2", "--", "--training.steps", "5"])
    assert (args.config, args.nproc, overrides) == (path, 2, ["--training.steps", "5"])
    assert launch.main([path, "--nproc", "2", "--dry-run", "--", "--training.steps", "5"]) == 0
    cmd = capsys.readouterr().out.split()
    assert "--" not in cmd
    assert cmd[-6:] == ["-m", "titan_moe.train", "--job.config_file", path, "--training.steps", "5"]
    # torchrun -m titan_moe.train on a cluster reads the same argv, with or without the separator.
    assert parse_run_config(["--job.config_file", path, "--", "--training.steps", "5"]).training.steps == 5


@pytest.mark.slow
def test_train_with_separator_trains(tmp_path):
    """`titan-moe train CFG --nproc 2 -- --training.steps 2` really trains 2 steps on 2 processes."""
    dump = tmp_path / "run"
    status = launch.main([config("tiny_dense"), "--nproc", "2", "--", "--training.steps", "2",
                          "--job.dump_folder", str(dump), "--metrics.no-enable-tensorboard",
                          "--checkpoint.no-enable"])
    assert status == 0
    steps = [json.loads(line)["step"] for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# -- [training].dataset and [data] before launch -----------------------------------


def _without_dataset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(open(config("tiny_dense")).read().replace('dataset = "synthetic"', ""))
    return path


def test_unset_dataset_is_mds_when_data_root_is_set(tmp_path):
    path = _without_dataset(tmp_path)
    root = write_prep_output(tmp_path / "mix", {"a": 40, "b": 40}, seq_len=64)
    job = load_run_config(path, ["--data.root", str(root)])
    assert job.training.dataset == "mds"
    plan = plan_run(job, world_size=2)
    args, mesh = plan.model_args, plan.mesh  # reads the real manifest: it passes
    assert (mesh.dp, args.dim) == (2, 64)


def test_unset_dataset_without_data_root_names_the_field_and_choices(tmp_path, capsys):
    path = _without_dataset(tmp_path)
    job = load_run_config(path)
    assert job.training.dataset == ""  # never torchtitan's "c4_test"
    with pytest.raises(ConfigError) as err:
        plan_run(job, world_size=1)
    assert err.value.field == "training.dataset"
    assert "is not set; choose 'synthetic' or 'mds'" in str(err.value)
    assert launch.main([str(path), "--nproc", "1"]) == 2
    assert "training.dataset: is not set; choose 'synthetic' or 'mds'" in capsys.readouterr().err


def test_bad_data_root_fails_before_launch(tmp_path, capsys):
    path = _without_dataset(tmp_path)
    missing = tmp_path / "no-such-prep"
    with pytest.raises(ConfigError) as err:
        plan_run(load_run_config(path, ["--data.root", str(missing)]), world_size=1)
    assert err.value.field == "data.root" and str(missing) in str(err.value)
    # The launcher stops there, before torchrun: not even the dump folder exists.
    dump = tmp_path / "dump"
    status = launch.main([str(path), "--nproc", "2", "--", "--data.root", str(missing), "--job.dump_folder", str(dump)])
    assert status == 2 and "data.root" in capsys.readouterr().err
    assert not dump.exists()


def test_train_spec_holds_no_run_state():
    """torchtitan's model-args table builds each run's args from that run's config (no module global)."""
    from titan_moe.trainer import train_spec

    table = train_spec.get_train_spec().model_args
    dense, moe = table["any flavor"], table["any flavor"]
    assert dense is not moe
    dense.update_from_config(load_run_config(config("tiny_dense")))
    moe.update_from_config(load_run_config(config("tiny_moe"), ["--training.seq_len", "32"]))
    assert (dense.args.moe.enabled, moe.args.moe.enabled, moe.args.max_seq_len) == (False, True, 32)
    # What torchtitan logs: JSON-safe, granularities as written.
    assert json.loads(json.dumps(moe.summary))["moe"]["expert_sets"][0]["granularity"] == "1/4"

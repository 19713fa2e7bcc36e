"""Sweeps on the run-config schema: dotted-path axes, scales by ladder rung, one edit adds a MoE knob."""

import csv
import json
import tomllib
from dataclasses import dataclass, field

import pytest

from jobs.sweep import cli, fields
from jobs.sweep.collect import write_results
from jobs.sweep.plan import build_plan, write_plan
from jobs.sweep.spec_check import parse_spec
from titan_moe.run_config import job_config
from titan_moe.common.errors import ConfigError
from titan_moe.model import args as model_args
from tests.sweep_support import ARCH, make_spec, spec_doc, write_spec


def _rows(plan_dir):
    with open(plan_dir / "index.csv") as f:
        return list(csv.DictReader(f))


def _toml(plan_dir, name):
    with open(plan_dir / "points" / name / "config.toml", "rb") as f:
        return tomllib.load(f)


# --------------------------------------------------------------------------- axes
def test_any_run_config_field_is_an_axis_written_into_configs_and_columns(tmp_path):
    out = tmp_path / "plan"
    path = write_spec(tmp_path, spec_doc(
        moe={"granularities": ["1/4"], "sparsities": [2]},
        axes={"optimizer.weight_decay": [0.0, 0.1], "moe.z_loss_weight": [0.001, 0.0]}))
    assert cli.main(["plan", str(path), "--out", str(out)]) == 0
    rows = {r["name"]: r for r in _rows(out)}
    # dense points cross only the non-[moe] axis; MoE points cross both (2 x 2)
    assert sorted(rows) == ["tiny_dense_weight0", "tiny_dense_weight0.1",
                            "tiny_g1-4_s2_weight0.1_z0", "tiny_g1-4_s2_weight0.1_z0.001",
                            "tiny_g1-4_s2_weight0_z0", "tiny_g1-4_s2_weight0_z0.001"]
    for name, row in rows.items():
        cfg = _toml(out, name)
        assert cfg["optimizer"]["weight_decay"] == float(row["optimizer.weight_decay"])
        if row["kind"] == "moe":
            assert cfg["moe"]["z_loss_weight"] == float(row["z_loss_weight"])
            assert cfg["moe"]["aux_loss_weight"] == 0.01  # unswept fields: the schema's default, written
        else:
            assert cfg["moe"] == {"enabled": False} and row["z_loss_weight"] == ""
    assert {(r["optimizer.weight_decay"], r["z_loss_weight"]) for r in rows.values() if r["kind"] == "moe"} == {
        ("0.0", "0.001"), ("0.0", "0.0"), ("0.1", "0.001"), ("0.1", "0.0")}


@pytest.mark.parametrize("axes, field, words", [
    ({"moe.aux_los_weight": [0.1]}, "spec.axes.moe.aux_los_weight", ["no field 'aux_los_weight'", "aux_loss_weight"]),
    ({"optimiser.weight_decay": [0.1]}, "spec.axes.optimiser.weight_decay", ["not a run-config section", "optimizer"]),
    ({"moe.aux_loss_weight": ["high"]}, "spec.axes.moe.aux_loss_weight[0]", ["'high'", "float"]),
    ({"training.steps": [10]}, "spec.axes.training.steps", ["set by the planner"]),
    ({"training.seq_len": [16, 32]}, "spec.axes.training.seq_len", ["steps follow from it"]),
    ({"moe.expert_sets": [[]]}, "spec.axes.moe.expert_sets", ["set by the design"]),
    ({"moe.capacity_factor": [1.0, 1.25]}, "spec.axes.moe.capacity_factor", ["spec.moe.routing", "capacity_factor: 1.25"]),
    ({"moe.z_loss_normalization": ["rows"]}, "spec.axes.moe.z_loss_normalization[0]", ["'rows'", "tokens"]),
    ({"moe.bias_update_rate": [-1.0]}, "spec.axes.moe.bias_update_rate[0]", [">= 0"]),
])
def test_a_bad_axis_is_refused_naming_it_before_anything_is_written(tmp_path, capsys, axes, field, words):
    path = write_spec(tmp_path, spec_doc(axes=axes))
    with pytest.raises(ConfigError) as info:
        make_spec(tmp_path, axes=axes)
    assert info.value.field == field
    for word in words:
        assert word in str(info.value)
    assert cli.main(["plan", str(path), "--out", str(tmp_path / "out")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_misspelled_fixed_run_value_is_refused_too():
    with pytest.raises(ConfigError) as info:
        parse_spec(spec_doc(run={"training": {"seq_len": 16, "global_batch_size": 8}, "optimizer": {"weigth_decay": 0.1}}))
    assert info.value.field == "spec.run.optimizer.weigth_decay" and "weight_decay" in str(info.value)


def test_moe_shorthands_are_axes_and_conflicts_are_refused():
    spec = parse_spec(spec_doc(moe={"granularities": ["1"], "sparsities": [2], "aux_loss_weights": [0.01, 0.001],
                                    "z_loss_weight": 0.0}))
    assert spec.axes == {"moe.aux_loss_weight": [0.01, 0.001]} and spec.run["moe"] == {"z_loss_weight": 0.0}
    with pytest.raises(ConfigError, match="shorthand"):
        parse_spec(spec_doc(moe={"granularities": ["1"], "sparsities": [2], "aux_loss_weights": [0.01]},
                            axes={"moe.aux_loss_weight": [0.1]}))


def test_axis_labels_come_from_the_schema():
    assert fields.axis_label("bias_update_rate") == "bias update rate: Loss-free balancing step size gamma"
    assert fields.axis_label("optimizer.weight_decay").startswith("optimizer weight decay")
    assert fields.axis_label("aux_loss_weight") == "aux loss weight"  # no docstring: the name in words
    assert fields.axis_label("sparsity_value").startswith("sparsity s = n / k")


# --------------------------------------------------------------------------- the one-edit knob
@dataclass
class MoEWithJitter(job_config.MoEConfig):
    router_jitter: float = 0.0
    """Router input jitter noise. Multiplies each token's router input by U(1 - x, 1 + x)."""


@dataclass
class MoEArgsWithJitter(model_args.MoEArgs, MoEWithJitter):
    """What ``MoEArgs(MoEConfig)`` is once the field is in MoEConfig itself."""


@dataclass
class JobWithJitter(job_config.JobConfig):
    moe: MoEWithJitter = field(default_factory=MoEWithJitter)


def test_a_field_added_to_moe_config_is_settable_sweepable_collected_and_plottable(tmp_path, monkeypatch, request):
    # The one edit: the field in MoEConfig.  Here it is swapped in where the class is named
    # (the schema, the run-config reader, the model args that subclass it); nothing in jobs/.
    monkeypatch.setattr(job_config, "MoEConfig", MoEWithJitter)
    monkeypatch.setattr(job_config, "JobConfig", JobWithJitter)
    monkeypatch.setattr(model_args, "MoEConfig", MoEWithJitter)
    monkeypatch.setattr(model_args, "MoEArgs", MoEArgsWithJitter)
    job_config.merged_job_config_class.cache_clear()
    request.addfinalizer(job_config.merged_job_config_class.cache_clear)

    out = tmp_path / "plan"
    spec = make_spec(tmp_path, moe={"granularities": ["1/2"], "sparsities": [2]},
                     axes={"moe.router_jitter": [0.0, 0.01]})
    write_plan(build_plan(spec, out), out)
    rows = {r["name"]: r for r in _rows(out)}
    assert sorted(rows) == ["tiny_dense", "tiny_g1-2_s2_router0", "tiny_g1-2_s2_router0.01"]
    assert "router_jitter" in fields.index_columns()
    assert rows["tiny_g1-2_s2_router0.01"]["router_jitter"] == "0.01"
    # settable in a TOML: the written table reads back through the schema and the model args
    moe = _toml(out, "tiny_g1-2_s2_router0.01")["moe"]
    assert moe["router_jitter"] == 0.01
    job = job_config.load_run_config(out / "points" / "tiny_g1-2_s2_router0.01" / "config.toml")
    assert job.moe.router_jitter == 0.01
    assert model_args.TitanMoEModelArgs.from_job_config(job).moe.router_jitter == 0.01
    # unswept, it is written at its default
    plain = tmp_path / "plain"
    write_plan(build_plan(make_spec(tmp_path, moe={"granularities": ["1"], "sparsities": [2]}), plain), plain)
    assert _toml(plain, "tiny_g1_s2")["moe"]["router_jitter"] == 0.0
    # a wrong type is refused naming it
    with pytest.raises(ConfigError) as info:
        make_spec(tmp_path, axes={"moe.router_jitter": [True]})
    assert info.value.field == "spec.axes.moe.router_jitter[0]"
    # collected: results.csv carries the column
    csv_path, _, _ = write_results(out)
    with open(csv_path) as f:
        results = {r["name"]: r for r in csv.DictReader(f)}
    assert results["tiny_g1-2_s2_router0.01"]["router_jitter"] == "0.01"
    # plottable: its axis label is the docstring's first sentence
    assert fields.axis_label("router_jitter") == "router jitter: Router input jitter noise"
    assert json.loads((out / "index.json").read_text())["points"][2]["router_jitter"] == 0.01


# --------------------------------------------------------------------------- ladder
LADDER = [{"name": "tiny", "arch": ARCH}, {"name": "wide", "arch": ARCH | {"dim": 64}, "learning_rates": [2e-3]}]


def test_scales_name_ladder_rungs():
    spec = parse_spec(spec_doc(ladder=LADDER, scales=["wide", {"name": "tiny", "learning_rates": [5e-4]}]))
    assert [(s.name, s.arch["dim"], s.learning_rates) for s in spec.scales] == [("wide", 64, [2e-3]),
                                                                                ("tiny", 32, [5e-4])]


@pytest.mark.parametrize("scales, field, words", [
    (["tiny", "huge"], "spec.scales[1]", ["'huge' is not a ladder rung", "tiny, wide"]),
    ([{"name": "tiny", "arch": ARCH | {"dim": 48}}], "spec.scales[0].arch", ["redefines the ladder rung 'tiny'"]),
    ([{"name": "wdie", "learning_rates": [1e-3]}], "spec.scales[0].name", ["'wdie' is not a ladder rung"]),
])
def test_unknown_or_redefined_rungs_are_refused(scales, field, words):
    with pytest.raises(ConfigError) as info:
        parse_spec(spec_doc(ladder=LADDER, scales=scales))
    assert info.value.field == field
    for word in words:
        assert word in str(info.value)


def test_a_rung_name_without_a_ladder_says_so():
    with pytest.raises(ConfigError, match="the spec has no ladder"):
        parse_spec(spec_doc(scales=["a50m"]))


def test_a_rungs_max_sparsity_travels_with_it_and_a_bad_one_is_refused(tmp_path):
    ladder = [LADDER[0] | {"max_sparsity": 8}, LADDER[1]]
    spec = parse_spec(spec_doc(ladder=ladder, scales=["tiny", "wide"],
                               moe={"granularities": ["1/2"], "sparsities": [8, 16]}))
    assert [(s.name, s.max_sparsity) for s in spec.scales] == [("tiny", 8), ("wide", None)]
    plan = build_plan(spec, tmp_path)
    assert sorted(p.name for p in plan.points) == ["tiny_dense", "tiny_g1-2_s8", "wide_dense", "wide_g1-2_s16",
                                                   "wide_g1-2_s8"]
    assert [(r["name"], r["points_skipped"]) for r in plan.invalid] == [("tiny_g1-2_s16", 1)]
    with pytest.raises(ConfigError) as info:
        parse_spec(spec_doc(ladder=[LADDER[0] | {"max_sparsity": "1/2"}], scales=["tiny"]))
    assert info.value.field == "spec.ladder[0].max_sparsity" and "must be >= 1" in str(info.value)

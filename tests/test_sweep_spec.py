"""Sweep specs: bad input names the field, extends/--set merge, the TOML writer round-trips."""

import tomllib
from fractions import Fraction

import pytest

from jobs.sweep import cli, tomlw
from jobs.sweep.spec_file import load_spec
from jobs.sweep.spec_check import parse_spec
from titan_moe.common.errors import ConfigError
from tests.sweep_support import ARCH, BASE, SPECS, spec_doc, write_spec


def _with(path: str, value):
    """BASE with one nested key set (``a.b.c``); value None deletes it."""
    doc = spec_doc()
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    "doc, field, words",
    [
        (_with("granularity", ["1/2"]), "spec.granularity", ["unknown key", "moe"]),
        (_with("moe.granularities", ["1", "3/2"]), "spec.moe.granularities[1]", ["3/2 is out of range", "0 < g <= 1"]),
        (_with("moe.sparsities", [0.5]), "spec.moe.sparsities[0]", [">= 1"]),
        (_with("moe.sparsities", None), "spec.moe.sparsities", ["need both granularities and sparsities"]),
        (_with("moe.granularities", ["1/2", "0.5"]), "spec.moe.granularities", ["1/2 twice"]),
        (_with("moe.routing", [{"mode": "capacity"}]), "spec.moe.routing[0].capacity_factor", ["required", "1.25"]),
        (_with("moe.routing", ["token-choice"]), "spec.moe.routing[0].mode", ["'token-choice'", "dropless, capacity"]),
        (_with("moe.routing", [{"mode": "capacity", "capacity_factor": 1.0, "capacity_policy": "position"}]),
         "spec.moe.routing[0].capacity_policy", ["'position'", "priority, megablocks"]),
        (_with("moe.routing", [{"mode": "dropless", "capacity_policy": "megablocks"}]),
         "spec.moe.routing[0].capacity_policy", ["only applies to mode: capacity"]),
        (_with("budget.tokens", 1000), "spec.budget.tokens", ["not both", "sets it to null"]),
        (_with("budget.params", "total"), "spec.budget.params", ["non_embedding_active, active"]),
        (_with("moe.heterogeneous", [[{"granularity": "1/2", "sparsity": 8}]]), "spec.moe.heterogeneous[0]", [">= 2 sets"]),
        (_with("moe.heterogeneous", [[{"granularity": "1/2", "sparsity": 8, "share": "1/2"},
                                      {"granularity": "1/8", "sparsity": 8}]]),
         "spec.moe.heterogeneous[0]", ["every set or for none"]),
        (_with("moe.generalist_granularities", ["1"]), "spec.moe.generalist_granularities[0]", ["0 <= g_gen < 1"]),
        (_with("run.training.global_batch_size", None), "spec.run.training.global_batch_size", ["positive number"]),
        (_with("run.optimizer", {"lr": 1e-3}), "spec.run.optimizer.lr", ["set by the planner", "learning_rates"]),
        (_with("run.moe", {"enabled": True}), "spec.run.moe.enabled", ["set by the planner"]),
        (_with("scales", [{"name": "tiny", "arch": ARCH | {"n_heads": 5}}]), "spec.scales[0].arch.n_heads",
         ["not divisible by n_heads 5"]),
        (_with("scales", [{"name": "Big Model", "arch": ARCH}]), "spec.scales[0].name", ["lowercase"]),
        (_with("matching", "iso_flop"), "spec.matching", ["flop, equal_resources"]),
        (_with("budget.basis", "total"), "spec.budget.basis", ["dense, point"]),
        (_with("learning_rates", [1e-3, 0.001]), "spec.learning_rates", ["0.001 twice"]),
        (_with("cluster.ep_degree", 0), "spec.cluster.ep_degree", ["integer >= 1"]),
        (_with("cluster.mfu", 40), "spec.cluster.mfu", ["0 < mfu <= 1"]),
    ],
)
def test_bad_spec_names_the_field(doc, field, words):
    with pytest.raises(ConfigError) as info:
        parse_spec(doc)
    assert info.value.field == field
    for word in words:
        assert word in str(info.value)


def test_equal_resources_refuses_point_basis_and_owned_data_keys():
    with pytest.raises(ConfigError, match="set basis: dense") as info:
        parse_spec(spec_doc(matching="equal_resources", budget={"basis": "point"}))
    assert info.value.field == "spec.budget.basis"
    run = spec_doc()["run"] | {"data": {"repeat": {"dclm": 2}}}
    with pytest.raises(ConfigError, match="set by the planner") as info:
        parse_spec(spec_doc(matching="equal_resources", run=run))
    assert info.value.field == "spec.run.data.repeat"


def test_extends_merges_mappings_replaces_lists_and_set_overrides(tmp_path):
    write_spec(tmp_path, spec_doc(cluster={"ep_degree": 2, "mfu": 0.5, "nodes": 3}), "base.yaml")
    child = {"extends": "base.yaml", "name": "child", "cluster": {"ep_degree": 4},
             "moe": {"granularities": ["1/8"], "sparsities": [4, 8]}}
    path = write_spec(tmp_path, child, "child.yaml")
    spec = load_spec(path, ["cluster.mfu=0.25", "run.data.root=/data/mds", "seeds=[1, 2]"])
    assert spec.name == "child"
    assert (spec.cluster.ep_degree, spec.cluster.nodes, spec.cluster.mfu) == (4, 3, 0.25)  # merged key by key
    assert spec.moe.granularities == [Fraction(1, 8)]  # lists replaced, not appended
    assert spec.moe.sparsities == [4, 8]
    assert spec.run["data"] == {"root": "/data/mds"}
    assert spec.run["training"]["seq_len"] == 16  # from the base
    assert spec.seeds == [1, 2]


def test_circular_extends_and_bad_override_are_refused(tmp_path):
    write_spec(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    write_spec(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match="circular extends chain: a.yaml -> b.yaml -> a.yaml"):
        load_spec(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_spec(write_spec(tmp_path, spec_doc()), ["cluster.ep_degree"])


def test_cli_reports_a_bad_spec_with_exit_2(tmp_path, capsys):
    path = write_spec(tmp_path, _with("moe.sparsities", [0]))
    assert cli.main(["plan", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "spec.moe.sparsities[0]" in err and ">= 1" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_shipped_specs_load_and_are_named_after_their_files():
    names = sorted(p.stem for p in SPECS.glob("*.yaml"))
    for required in ("main_grid", "heterogeneous", "generalist", "dropless_vs_default", "load_balancing",
                     "equal_resources", "mini"):
        assert required in names
    for path in SPECS.glob("*.yaml"):
        if path.stem in ("paper_base", "ladder"):
            continue  # a shared base and the scale ladder, not studies (they have no name)
        spec = load_spec(path)
        assert spec.name == path.stem
    assert load_spec(SPECS / "equal_resources.yaml").matching == "equal_resources"
    assert len(load_spec(SPECS / "heterogeneous.yaml").moe.heterogeneous) == 16  # Table 3: 4 pairs x 4 sparsities
    fixed = load_spec(SPECS / "more_data_10m.yaml").budget  # tokens_per_param: null lifts the base's ratio
    assert (fixed.tokens, fixed.multiples) == (200_000_000, [1.0, 20.0])


def test_toml_writer_round_trips_run_config_shapes():
    doc = {
        "job": {"dump_folder": "/runs/a b/\"quoted\"\\x", "description": "line 1\nline 2 ü"},
        "moe": {"enabled": True, "expert_sets": [{"num_experts": 8, "granularity": "1/4", "top_k": 2},
                                                 {"num_experts": 4, "granularity": "1/2", "top_k": 1}],
                "capacity_factor": None, "aux_loss_weight": 1e-05},
        "training": {"steps": 12, "seq_len": 16, "dataloader": {"num_workers": 2, "pin_memory": False}},
        "data": {"repeat": {"dclm": 1.6376146788990826, "open-web-math": 2.0}, "mixture": "natural", "empty": {}},
        "odd": {"dotted.key": [1, 2.5, "x"]},
    }
    text = tomlw.dumps(doc, "header line\nsecond")
    assert text.startswith("# header line\n# second\n")
    expected = {**doc, "moe": {k: v for k, v in doc["moe"].items() if v is not None}}
    assert tomllib.loads(text) == expected
    assert "dataloader = { num_workers = 2, pin_memory = false }" in text  # plain nested mapping: inline
    assert 'repeat = { dclm = 1.6376146788990826, open-web-math = 2.0 }' in text
    with pytest.raises(ValueError, match="x.y"):
        tomlw.dumps({"x": {"y": float("nan")}})


def test_base_spec_is_valid_as_used_by_other_tests():
    assert parse_spec(BASE).scales[0].arch == ARCH

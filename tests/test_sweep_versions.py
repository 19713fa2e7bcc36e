"""`sweep collect` carries each point's torch/torchtitan versions (from its checkpoints' COMMITTED
markers, the real format the trainer writes) and flags a sweep whose points ran on different ones."""

import csv

import pytest

from jobs.sweep import cli
from jobs.sweep.plan import build_plan, write_plan
from titan_moe.checkpoint import catalog
from tests.sweep_support import make_spec

OLD = {"torch": "2.11.0+cu130", "torchtitan": "0.2.2", "titan_moe": "0.1.0"}
NEW = {"torch": "2.15.0+cu132", "torchtitan": "0.2.2", "titan_moe": "0.1.0"}


@pytest.fixture
def plan_dir(tmp_path):
    out = tmp_path / "plan"
    write_plan(build_plan(make_spec(tmp_path), out), out)
    return out


def checkpoint(point_dir, step, versions):
    """A committed step-N checkpoint in the point's default folder, as the trainer's rank 0 commits it."""
    path = point_dir / "checkpoint" / f"step-{step}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"\0" * 64)
    catalog.commit(str(path), step, versions=versions)


def collected(plan_dir, capsys):
    assert cli.main(["collect", str(plan_dir)]) == 0
    err = capsys.readouterr().err
    with open(plan_dir / "results.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}, err, (plan_dir / "results.md").read_text()


def test_rows_carry_versions_and_a_sweep_on_two_torch_versions_is_flagged(plan_dir, capsys):
    points = plan_dir / "points"
    checkpoint(points / "tiny_dense", 10, OLD)
    checkpoint(points / "tiny_g1_s2", 10, NEW)
    checkpoint(points / "tiny_g1-4_s2", 10, OLD)  # preempted, then resumed under the newer torch
    checkpoint(points / "tiny_g1-4_s2", 20, NEW)

    rows, err, md = collected(plan_dir, capsys)
    assert (rows["tiny_dense"]["torch_version"], rows["tiny_dense"]["torchtitan_version"]) == ("2.11.0+cu130", "0.2.2")
    assert rows["tiny_g1_s2"]["torch_version"] == "2.15.0+cu132"
    assert rows["tiny_g1-4_s2"]["torch_version"] == "2.11.0+cu130; 2.15.0+cu132"
    expected = ("points ran on different versions -- torch 2.11.0+cu130 (2: tiny_dense, tiny_g1-4_s2) vs "
                "2.15.0+cu132 (2: tiny_g1_s2, tiny_g1-4_s2): their losses are not bit-comparable")
    assert f"warning: {expected}" in err
    assert f"**Warning:** {expected}" in md
    assert "torchtitan 0.2.2" not in err  # one torchtitan everywhere: not flagged


def test_one_version_everywhere_is_not_flagged(plan_dir, capsys):
    for name in ("tiny_dense", "tiny_g1_s2"):
        checkpoint(plan_dir / "points" / name, 10, NEW)
    rows, err, md = collected(plan_dir, capsys)
    assert rows["tiny_g1_s2"]["torch_version"] == "2.15.0+cu132"
    assert rows["tiny_g1-4_s2"]["torch_version"] == ""  # never checkpointed: nothing recorded
    assert "different versions" not in err and "Warning" not in md

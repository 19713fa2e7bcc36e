"""`sweep launch`: local runs are resumable (finished points skipped), k8s renders one manifest set per point.

The local tests stand in a small script for `titan-moe train` / `titan-moe eval`
(the launcher's job is ordering, logging, markers and resuming, not training;
the trainer has its own tests) -- every other piece is real.
"""

import json
import sys

import pytest
import yaml

from jobs.sweep import cli
from jobs.sweep.launch import eval_command, launch_k8s, launch_local, train_command
from jobs.sweep.plan import build_plan, write_plan
from jobs.sweep.spec_file import load_spec
from titan_moe.common.errors import ConfigError
from tests.sweep_support import SPECS, make_spec

# Appends "<nproc>" to POINT/runs.txt; fails with exit 3 while POINT/FAIL exists.
FAKE_TRAIN = """
import pathlib, sys
point = pathlib.Path(sys.argv[1]).parent
with open(point / "runs.txt", "a") as f:
    f.write(sys.argv[2] + "\\n")
print("training", point.name)
sys.exit(3 if (point / "FAIL").exists() else 0)
"""
FAKE_EVAL = """
import json, pathlib, sys
point = pathlib.Path(sys.argv[1])
json.dump({"tasks": {"paloma": {"macro_ce": 3.5}}, "argv": sys.argv[2:]}, open(point / "eval.json", "w"))
"""


def fake_train(config, nproc):
    return [sys.executable, "-c", FAKE_TRAIN, str(config), str(nproc)]


def fake_eval(point_dir, tasks, extra):
    return [sys.executable, "-c", FAKE_EVAL, str(point_dir), tasks, *extra]


@pytest.fixture
def plan_dir(tmp_path):
    spec = make_spec(tmp_path, cluster={"ep_degree": 1, "local_nproc": 2})
    out = tmp_path / "plan"
    write_plan(build_plan(spec, out), out)
    return out


def _runs(plan_dir, name):
    path = plan_dir / "points" / name / "runs.txt"
    return path.read_text().split() if path.exists() else []


def test_local_launch_marks_only_successes_and_resumes(plan_dir):
    names = ["tiny_dense", "tiny_g1_s2", "tiny_g1-4_s2"]
    (plan_dir / "points" / "tiny_g1_s2" / "FAIL").touch()
    report = launch_local(plan_dir, make_train_command=fake_train, make_eval_command=fake_eval, eval_tasks="paloma",
                          eval_args=["--limit", "2"])
    assert (report.ran, report.failed) == (["tiny_dense", "tiny_g1-4_s2"], ["tiny_g1_s2"])
    assert report.evaluated == ["tiny_dense", "tiny_g1-4_s2"] and not report.ok
    failed = plan_dir / "points" / "tiny_g1_s2"
    assert not (failed / ".done").exists() and json.loads((failed / ".failed").read_text())["returncode"] == 3
    assert not (failed / "eval.json").exists()  # a failed point is not scored
    assert "training tiny_g1_s2" in (failed / "train.log").read_text()
    done = json.loads((plan_dir / "points" / "tiny_dense" / ".done").read_text())
    assert done["command"][-1] == "2"  # nproc from the spec's cluster.local_nproc
    assert json.loads((plan_dir / "points" / "tiny_dense" / "eval.json").read_text())["argv"] == ["paloma", "--limit", "2"]

    (failed / "FAIL").unlink()
    report = launch_local(plan_dir, 1, make_train_command=fake_train, make_eval_command=fake_eval, eval_tasks="paloma")
    assert (report.ran, report.skipped, report.failed) == (["tiny_g1_s2"], ["tiny_dense", "tiny_g1-4_s2"], [])
    assert report.evaluated == ["tiny_g1_s2"] and report.ok  # the others already have eval.json
    assert [_runs(plan_dir, n) for n in names] == [["2"], ["2", "1"], ["2"]]
    assert not (failed / ".failed").exists() and (failed / ".done").exists()


def test_local_launch_only_dry_run_and_stop_on_failure(plan_dir, capsys):
    report = launch_local(plan_dir, only=["*g1-4*"], dry_run=True)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].endswith("tiny_g1-4_s2/config.toml --nproc 2")
    assert report.ran == [] and _runs(plan_dir, "tiny_g1-4_s2") == []
    with pytest.raises(ConfigError, match="no point of .* matches nothing-*"):
        launch_local(plan_dir, only=["nothing-*"])
    (plan_dir / "points" / "tiny_dense" / "FAIL").touch()
    report = launch_local(plan_dir, stop_on_failure=True, make_train_command=fake_train)
    assert report.failed == ["tiny_dense"] and report.ran == []  # stopped at the first point


def test_commands_call_titan_moe_train_and_eval(tmp_path):
    config = tmp_path / "p" / "config.toml"
    assert train_command(config, 2) == [sys.executable, "-m", "titan_moe.cli", "train", str(config), "--nproc", "2"]
    assert eval_command(tmp_path / "p", "paloma,boolq", ["--limit", "5"]) == [
        sys.executable, "-m", "titan_moe.cli", "eval", "--checkpoint", str(tmp_path / "p" / "checkpoint"),
        "--config", str(config), "--tasks", "paloma,boolq", "--out", str(tmp_path / "p" / "eval.json"), "--limit", "5"]


def test_k8s_launch_renders_one_manifest_set_per_point(tmp_path, capsys):
    pytest.importorskip("jobs.k8s.render", reason="the k8s renderer (jobs/k8s) is not in this build")
    out = tmp_path / "mini"
    # Synthetic tokens carry no tokenizer: name where the cluster's eval Job finds one (render requires it).
    write_plan(build_plan(load_spec(SPECS / "mini.yaml", ["run.model.hf_assets_path=/models/tok"]), out), out)
    report = launch_k8s(out, nodes=1, gpus_per_node=2, image="registry.example/titan-moe:0.1.0")
    assert len(report.rendered) == 4 and report.failed == []
    jobset = yaml.safe_load((out / "points" / "mini_g1-2_s4" / "k8s" / "jobset.yaml").read_text())
    assert jobset["metadata"]["name"] == "mini-mini-g1-2-s4"
    assert "num_experts = 8" in yaml.safe_load((out / "points" / "mini_g1-2_s4" / "k8s" / "configmap.yaml").read_text())["data"]["run.toml"]

    # 1 GPU: EP 2 does not fit the mesh of the MoE points; the dense point still renders.
    report = launch_k8s(out, nodes=1, gpus_per_node=1, image="registry.example/titan-moe:0.1.0")
    assert report.rendered == ["mini_dense"] and report.failed == ["mini_g1_s4", "mini_g1-2_s4", "mini_g1-4_s4"]
    assert "cannot render mini_g1_s4: parallelism.expert_parallel_degree" in capsys.readouterr().err

    assert cli.main(["launch", str(out), "--k8s", "--only", "mini_dense"]) == 1  # no --image
    assert "cannot render mini_dense" in capsys.readouterr().err

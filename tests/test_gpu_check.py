"""`titan-moe gpu-check --smoke`: every stage at toy shapes on CPU, its JSON report and exit status."""

import json
import os
import subprocess
import sys

import pytest

from tests.distributed_utils import REPO
from titan_moe.errors import ConfigError
from titan_moe.gpu_check import REPORT_NAME, STAGES, format_table, report_path


def gpu_check(tmp_path, *args, timeout=2400):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "titan_moe.cli", "gpu-check", "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_runs_every_stage_and_passes(tmp_path):
    proc, report = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["passed"] and report["smoke"]
    assert [s["stage"] for s in report["stages"]] == [s.name for s in STAGES]
    assert all(s["status"] == "pass" for s in report["stages"])
    by_name = {s["stage"]: s for s in report["stages"]}
    # CPU is honest about what it cannot count, and counts what it can: zero sync ops.
    syncs = by_name["host_syncs"]["details"]
    assert syncs["dropless"] == {"sync_ops": {}, "cuda_syncs": "n/a on CPU"}
    assert syncs["capacity"]["sync_ops"] == {}
    for routing in ("dropless", "capacity"):
        assert max(by_name["grouped_vs_loop"]["details"][routing].values()) <= 2e-2
    losses = by_name["train_compiled"]["details"]["losses"]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert by_name["bench"]["details"]["ratio"] > 0
    assert "stage" in proc.stdout and "all stages passed" in proc.stdout


def test_a_stage_past_its_deadline_fails_the_command(tmp_path):
    # A deadline no stage can meet: the stage is killed, reported as "timeout", exit status 1.
    proc, report = gpu_check(tmp_path, "--stages", "host_syncs", "--deadline-scale", "0.001", timeout=300)
    assert proc.returncode == 1
    assert not report["passed"]
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [("host_syncs", "timeout")]
    assert "FAILED" in proc.stdout


def test_unknown_stage_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "titan_moe.cli", "gpu-check", "--smoke", "--stages", "bench,warp"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--stages: unknown warp; valid: grouped_vs_loop, host_syncs, train_compiled, bench" in proc.stderr


def test_table_lists_each_stage_with_result_and_deadline():
    table = format_table([{"stage": "bench", "status": "fail", "seconds": 12.3, "deadline_s": 250,
                           "summary": "0.90x torchtitan tokens/s"}])
    assert table.splitlines()[1].split()[:3] == ["bench", "fail", "12.3/250"]


def test_out_folder_gets_the_report_inside_it(tmp_path):
    # A folder as --out: the report lands in it (the stage is killed at once; only where the report goes matters).
    proc = subprocess.run([sys.executable, "-m", "titan_moe.cli", "gpu-check", "--smoke", "--out", str(tmp_path),
                           "--stages", "host_syncs", "--deadline-scale", "0.001", "--workdir", str(tmp_path / "w")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    assert [s["stage"] for s in report["stages"]] == ["host_syncs"]


def test_unusable_out_is_refused_before_any_stage(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    proc = subprocess.run([sys.executable, "-m", "titan_moe.cli", "gpu-check", "--smoke", "--out",
                           str(blocker / "report.json"), "--workdir", str(tmp_path / "w")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"--out: {blocker} is a file, not a folder" in proc.stderr
    assert "[gpu-check]" not in proc.stdout and not (tmp_path / "w").exists()  # no stage ran
    assert blocker.read_text() == "keep"
    (tmp_path / "d" / REPORT_NAME).mkdir(parents=True)
    with pytest.raises(ConfigError, match="is a folder; pass a file path"):
        report_path(str(tmp_path / "d"))

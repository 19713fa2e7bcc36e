"""`titan-moe gpu-check --smoke`: every stage at toy shapes on CPU, its JSON report and exit status."""

import json
import os
import subprocess
import sys

import pytest

from tests.distributed_utils import REPO
from titan_moe.common.errors import ConfigError
from titan_moe.gpu_check import REPORT_NAME, STAGES, bench_meets_targets, format_table, report_path


def gpu_check(tmp_path, *args, timeout=2400):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "titan_moe.cli", "gpu-check", "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.stress  # ~4 minutes; the main suite runs the command through grouped_vs_loop (test_wheel_install),
# host syncs (test_model_routing), compiled training (test_model_compile) and a stage deadline (below)
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
    # The bench's whole distribution is in the report: two interleaved repeats of each engine.
    bench = by_name["bench"]["details"]
    assert bench["repeats"] == 2 and len(bench["ratios"]) == 2
    assert bench["ratio_low"] <= bench["ratio_median"] <= bench["ratio_high"]
    assert bench["verdict"] == "inconclusive"  # two repeats are too few for a verdict
    assert [len(bench[e]["runs"]) for e in ("titan_moe", "baseline")] == [2, 2]
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


def bench_summary(ratios, mfus):
    ordered = sorted(ratios)
    verdict = "faster" if ordered[0] >= 1.1 else "slower" if ordered[-1] < 1.1 else "inconclusive"
    return {"ratio_low": ordered[0], "ratio_high": ordered[-1], "verdict": verdict,
            "titan_moe": {"MFU % interval": [min(mfus), max(mfus)]}}


def test_bench_targets_apply_to_the_low_end_of_each_interval():
    # Median 1.2x and 45% MFU, but one repeat at 1.05x: the interval reaches below 1.1x, no pass.
    assert not bench_meets_targets(bench_summary([1.2, 1.25, 1.05, 1.2, 1.3], [45.0] * 5))
    assert bench_meets_targets(bench_summary([1.2, 1.25, 1.1, 1.2, 1.3], [45.0, 41.0, 44.0, 46.0, 45.0]))
    # Ratio clear, but one repeat's MFU under 40%.
    assert not bench_meets_targets(bench_summary([1.2] * 5, [45.0, 39.5, 44.0, 46.0, 45.0]))


def test_gpu_bench_stage_judges_the_interval_from_interleaved_repeats(tmp_path, monkeypatch):
    # The GPU stage end to end with an injected runner instead of training: what it asks bench
    # for (5 repeats, the OLMoE shape), what it reports, and the pass rule on the low ends.
    from titan_moe import bench, gpu_check

    calls = []

    def runner_for(ratios, mfu):
        def run(engine, i):
            calls.append((engine, i))
            tps = 1000.0 * (ratios[i] if engine == "titan_moe" else 1.0)
            return {"tokens/s per device": tps, "MFU %": mfu if engine == "titan_moe" else 30.0,
                    "TFLOP/s per device": 1.0, "peak memory GiB": 100.0, "steps timed": 6,
                    "step tokens/s": [tps] * 6, "final loss": 9.0}
        return run

    for ratios, mfu, passed in [([1.2, 1.25, 1.15, 1.2, 1.3], 45.0, True),
                                ([1.2, 1.25, 1.05, 1.2, 1.3], 45.0, False),  # median 1.2x, low end 1.05x
                                ([1.2, 1.25, 1.15, 1.2, 1.3], 38.0, False)]:
        calls.clear()
        monkeypatch.setattr(bench, "process_runner", lambda *a, _r=runner_for(ratios, mfu): _r)
        result = gpu_check.stage_bench(smoke=False, workdir=tmp_path)
        assert result["passed"] is passed, (ratios, mfu, result["summary"])
        assert calls == [(e, i) for i in range(5) for e in ("titan_moe", "baseline")]
        details = result["details"]
        assert details["repeats"] == 5 and details["ratios"] == pytest.approx(ratios)
        assert len(details["titan_moe"]["runs"]) == 5  # the whole distribution goes into gpu_check.json
    assert result["summary"].startswith("1.20x torchtitan tokens/s (1.15-1.30, 94% interval, 5 repeats): faster")


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

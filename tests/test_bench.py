"""`titan-moe bench` without training: the two engines interleaved, its summary.json and its verdict.

An injected runner stands in for the training processes (``bench.main(argv, runner=...)``),
so these tests check the order of the runs and the arithmetic on fixed numbers in seconds.
"""

import json

import pytest

from titan_moe import bench

# tokens/s per repeat: titan_moe, baseline.
OURS = [1300.0, 1200.0, 1320.0, 1100.0, 1250.0]
BASE = [1000.0, 1000.0, 1100.0, 1000.0, 1000.0]


def fake_run(engine: str, i: int, tokens_per_s: float) -> dict:
    return {"tokens/s per device": tokens_per_s, "MFU %": tokens_per_s / 100, "TFLOP/s per device": 1.0,
            "peak memory GiB": 2.0 + i if engine == "titan_moe" else 3.0, "steps timed": 8,
            "step tokens/s": [tokens_per_s] * 8, "final loss": 9.0 - i}


class Recorder:
    def __init__(self, ours, base):
        self.sides = {"titan_moe": ours, "baseline": base}
        self.calls = []

    def __call__(self, engine, i):
        self.calls.append((engine, i))
        return fake_run(engine, i, self.sides[engine][i])


def run_bench(tmp_path, capsys, ours, base, *args):
    recorder = Recorder(ours, base)
    out = tmp_path / "bench"
    status = bench.main(["bench_cpu_small", "--repeats", str(len(ours)), "--out", str(out), *args], runner=recorder)
    return status, recorder.calls, json.loads((out / "summary.json").read_text()), capsys.readouterr().out


def test_engines_alternate_and_summary_has_the_interval(tmp_path, capsys):
    status, calls, summary, stdout = run_bench(tmp_path, capsys, OURS, BASE)
    assert status == 0
    assert calls == [(engine, i) for i in range(5) for engine in ("titan_moe", "baseline")]
    # Per pair 1.3, 1.2, 1.2, 1.1, 1.25: median 1.2, min..max 1.1..1.3; 1.1 is cleared.
    assert summary["repeats"] == 5
    assert (summary["ratio_median"], summary["ratio_low"], summary["ratio_high"]) == pytest.approx((1.2, 1.1, 1.3))
    assert summary["ratios"] == pytest.approx([1.3, 1.2, 1.2, 1.1, 1.25])
    assert summary["verdict"] == "faster"
    ours = summary["titan_moe"]
    assert ours["tokens/s per device"] == 1250.0 and ours["MFU %"] == 12.5
    assert ours["MFU % interval"] == [11.0, 13.2]
    assert ours["peak memory GiB"] == 6.0  # the largest over the repeats
    assert len(ours["runs"]) == 5 and summary["baseline"]["tokens/s per device"] == 1000.0
    # The output says how many repeats and steps, one progress line per repeat, and the interval.
    assert "5 repeats of each engine, interleaved; 10 steps per run (2 warm-up, 8 timed)" in stdout
    assert [line for line in stdout.splitlines() if line.startswith("[bench] repeat")][1] == (
        "[bench] repeat 2/5: titan_moe 1,200.0 tokens/s, baseline 1,000.0 tokens/s, ratio 1.200")
    assert "1.2x (1.1-1.3x, 94% interval, 5 repeats); verdict vs 1.1x: faster" in stdout


def test_straddling_interval_is_inconclusive(tmp_path, capsys):
    _, _, summary, stdout = run_bench(tmp_path, capsys, [1050.0, 1150.0, 1120.0, 1080.0, 1200.0], [1000.0] * 5)
    assert summary["verdict"] == "inconclusive"
    assert (summary["ratio_low"], summary["ratio_high"]) == pytest.approx((1.05, 1.2))
    assert "inconclusive (the interval straddles 1.1x)" in stdout


def test_target_flag_moves_the_verdict(tmp_path, capsys):
    _, _, summary, _ = run_bench(tmp_path, capsys, OURS, BASE, "--target", "1.35")
    assert summary["verdict"] == "slower" and summary["target"] == 1.35


def test_summarize_takes_the_median_after_warmup():
    rows = [{"step": s, "throughput(tps)": tps, "mfu(%)": 1.0, "tflops": 2.0, "memory/max_reserved(GiB)": mem,
             "loss_metrics/global_avg_loss": 10.0 - s}
            for s, tps, mem in [(1, 10.0, 9.0), (2, 20.0, 1.0), (3, 900.0, 1.5), (4, 1000.0, 1.2), (5, 5.0, 1.1)]]
    run = bench.summarize(rows, warmup=2)
    # Steps 3-5 only: median 900 (one stalled step cannot move it); peak memory of the timed steps.
    assert run["tokens/s per device"] == 900.0 and run["steps timed"] == 3
    assert run["step tokens/s"] == [900.0, 1000.0, 5.0]
    assert run["peak memory GiB"] == 1.5 and run["final loss"] == 5.0


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--repeats", "0", "--repeats: must be >= 1 (got 0); use >= 5 for a verdict"),
    ("--steps", "2", "--steps: must be > 2 (the warm-up steps are not timed); got 2"),
])
def test_bad_counts_are_refused_before_any_run(tmp_path, capsys, flag, value, message):
    recorder = Recorder(OURS, BASE)
    status = bench.main(["bench_cpu_small", flag, value, "--out", str(tmp_path / "b")], runner=recorder)
    assert status == 2 and recorder.calls == []
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

"""End to end: ``titan-moe demo`` with few steps, in a temporary directory.

The same code path as ``python3 run.py demo``: synthetic corpus -> prep ->
sweep plan (mini.yaml) -> sweep launch --local (torchrun, 2 CPU processes,
FSDP2 + EP 2) with eval of every final checkpoint -> collect -> plot.  Then a
second run must find everything done and redo nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import struct
from pathlib import Path

import pytest

from jobs import demo
from jobs import synthetic_corpus as corpus

STEPS = 12
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path}: first chunk is {kind!r}, not IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run shared by the tests: (out dir, exit status, what it printed)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = demo.main(["--out", str(out), "--steps", str(STEPS)])
    return out, rc, printed.getvalue()


@pytest.mark.slow
@pytest.mark.stress  # the whole demo (~3 min on 2 cores): .ci/run's second step, beside the stress tests
def test_demo_trains_evaluates_and_plots_every_point(demo_run):
    out, rc, text = demo_run
    assert rc == 0, text[-3000:]
    sweep = out / f"sweep-{STEPS}steps"

    # prep rejected exactly the planted lines, and said so
    manifest = json.loads((out / "object_store" / "olmoe-mix-synthetic" / "seq64" / "manifest.json").read_text())
    assert set(manifest["sources"]) == set(corpus.SOURCES)
    for source in manifest["sources"].values():
        assert source["rejected_by_reason"] == corpus.PLANTED_REJECTS
    planted = sum(corpus.PLANTED_REJECTS.values()) * len(corpus.SOURCES)
    assert f"rejected {planted} malformed lines of the {planted} planted (all of them)" in text
    assert "NOT Paloma" in text

    # every planned point: finished, a finite loss over all STEPS steps, an eval
    index = json.loads((sweep / "index.json").read_text())
    names = [p["name"] for p in index["points"]]
    assert names == ["mini_dense", "mini_g1_s4", "mini_g1-2_s4", "mini_g1-4_s4"]
    with open(sweep / "results.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names)
    for name in names:
        row = rows[name]
        assert row["status"] == "done", name
        assert int(row["last_step"]) == STEPS, name
        loss = float(row["train_loss"])
        assert math.isfinite(loss) and 0 < loss < math.log(1024) + 2, (name, loss)
        if name != "mini_dense":  # MoE health made it from TensorBoard into the table
            assert math.isfinite(float(row["moe_load_imbalance"])) and float(row["moe_load_imbalance"]) >= 1.0

        ev = json.loads((sweep / "points" / name / "eval.json").read_text())
        assert ev["step"] == STEPS
        subsets = ev["tasks"]["paloma"]["subsets"]
        assert set(subsets) == set(corpus.PALOMA_STANDINS.values())
        ces = [s["ce"] for s in subsets.values()]
        assert all(math.isfinite(c) and c > 0 for c in ces)
        assert all(s["documents"] == demo.HELDOUT_DOCS for s in subsets.values())
        assert math.isclose(ev["tasks"]["paloma"]["macro_ce"], sum(ces) / len(ces), rel_tol=1e-9)
        assert math.isclose(float(row["paloma_macro_ce"]), ev["tasks"]["paloma"]["macro_ce"], rel_tol=1e-6)

    # the printed Markdown tables hold one row per point
    for name in names:
        assert re.search(rf"^\| {re.escape(name)} \|", text, re.M), name
        # results, held-out CE, and the reading against the paper (jobs/demo_reading.py)
        assert len(re.findall(rf"^\| {re.escape(name)} \|", text, re.M)) == 3
    assert re.search(r"^\*\*(Dense wins|MoE wins|A tie)\*\*", text, re.M), "the demo reads its own result"

    # figures: the ones printed exist and are real PNG images
    figures = [Path(line.strip()) for line in text.splitlines() if line.strip().endswith(".png")]
    expected = {"loss_vs_granularity_mini.png", "loss_vs_total_experts_mini.png", "training_curves.png"}
    assert expected <= {f.name for f in figures}
    assert len(figures) == 5
    for fig in figures:
        assert fig.is_file() and fig.stat().st_size > 5000, fig
        width, height = png_size(fig)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (fig, width, height)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(sweep / "plots" / "training_curves.png"))
    assert pixels.shape[:2] == png_size(sweep / "plots" / "training_curves.png")[::-1]
    assert pixels.std() > 0.01  # something was drawn
    assert f"tensorboard --logdir {sweep / 'points'}" in text


@pytest.mark.slow
@pytest.mark.stress
def test_demo_rerun_resumes_without_redoing_work(demo_run, capsys):
    out, rc, _ = demo_run
    assert rc == 0
    sweep = out / f"sweep-{STEPS}steps"
    points = sorted((sweep / "points").iterdir())
    before = {p.name: ((p / ".done").read_text(), (p / "eval.json").stat().st_mtime_ns) for p in points}
    manifest_before = (out / "object_store" / "olmoe-mix-synthetic" / "seq64" / "manifest.json").read_text()

    assert demo.main(["--out", str(out), "--steps", str(STEPS)]) == 0
    text = capsys.readouterr().out
    assert "trained 0, skipped 4 finished earlier, failed 0; evaluated 0" in text
    assert "already prepped" in text and "corpus already in" in text
    after = {p.name: ((p / ".done").read_text(), (p / "eval.json").stat().st_mtime_ns) for p in points}
    assert after == before
    assert (out / "object_store" / "olmoe-mix-synthetic" / "seq64" / "manifest.json").read_text() == manifest_before

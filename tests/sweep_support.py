"""Small sweep specs shared by the sweep tests (tiny shapes: planning takes seconds)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from jobs.sweep.spec import SweepSpec
from jobs.sweep.spec_file import load_spec

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "jobs" / "specs"

# ffn_hidden 128 is divisible by 64, so every granularity 1 .. 1/64 has an integral width.
ARCH = {"dim": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 128, "vocab_size": 300}

BASE = {
    "name": "t",
    "cluster": {"ep_degree": 1, "mfu": 0.5, "peak_tflops": 100.0},
    "budget": {"tokens_per_param": 20},
    "scales": [{"name": "tiny", "arch": ARCH}],
    "moe": {"granularities": ["1", "1/4"], "sparsities": [2]},
    "learning_rates": [1e-3],
    "seeds": [0],
    "run": {"training": {"seq_len": 16, "global_batch_size": 8, "local_batch_size": 4, "dataset": "synthetic"}},
}


def spec_doc(**changes) -> dict:
    """BASE with top-level keys replaced (mappings are replaced whole, not merged)."""
    doc = copy.deepcopy(BASE)
    doc.update(copy.deepcopy(changes))
    return doc


def write_spec(tmp_path: Path, doc: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def make_spec(tmp_path: Path, **changes) -> SweepSpec:
    return load_spec(write_spec(tmp_path, spec_doc(**changes)))

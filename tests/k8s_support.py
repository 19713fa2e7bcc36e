"""Shared pieces of the Kubernetes tests: tiny run configs, the JobSet CRD, YAML reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
JOBSET_CRD = REPO / ".." / "shared" / "data" / "k8s" / "jobset.x-k8s.io_jobsets.yaml"
IMAGE = "registry.example.com/ml/titan-moe:0.1.0"


def crd_path() -> Path:
    if not JOBSET_CRD.is_file():
        pytest.skip(f"JobSet CRD schema not found at {JOBSET_CRD} (the repo's sibling ../shared/data/k8s)")
    return JOBSET_CRD


def run_toml(
    *,
    num_experts: int = 8,
    moe: bool = True,
    steps: int = 4,
    checkpoint: str = "",
    **parallelism: int,
) -> str:
    """A tiny synthetic-data run config; ``parallelism`` keys are torchtitan's [parallelism] names."""
    lines = [
        "[model]",
        'name = "titan_moe"',
        "[arch]",
        "dim = 32",
        "n_layers = 2",
        "n_heads = 4",
        "ffn_hidden = 64",
        "vocab_size = 256",
        "[moe]",
        f"enabled = {'true' if moe else 'false'}",
        f'expert_sets = [ {{ num_experts = {num_experts}, granularity = "1/4", top_k = 2 }} ]',
        'generalist_granularity = "1/2"',
        "require_flop_match = true",
        "[training]",
        'dataset = "synthetic"',
        "seq_len = 16",
        "local_batch_size = 2",
        f"steps = {steps}",
        "[parallelism]",
        *(f"{k} = {v}" for k, v in parallelism.items()),
    ]
    if checkpoint:
        lines += ["[checkpoint]", checkpoint]
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, name: str = "tiny-moe", **kwargs) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(run_toml(**kwargs))
    return path


def load(path: Path) -> dict:
    (obj,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return obj


def trainer_pod(jobset: dict) -> dict:
    (rjob,) = jobset["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]["spec"]

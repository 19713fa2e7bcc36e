"""Helpers for tests that launch real multi-process training with torchrun (gloo on CPU).

``torchrun`` runs ``python -m torch.distributed.run`` with the test's Python;
``run_trainer_jobs`` starts one torchrun whose ranks train several run configs
back to back in the same process group (``tests/trainer_jobs.py``), which
saves the ~20 s of imports and rendezvous a torchrun costs on a small machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "titan_moe" / "configs"
JOBS_DRIVER = Path(__file__).resolve().parent / "trainer_jobs.py"


class TorchrunError(AssertionError):
    pass


def torchrun(args: list[str], nproc: int, log: Path, timeout: float = 600, env: dict | None = None) -> str:
    """Run ``torchrun --standalone --nproc_per_node nproc ARGS``; return its output, raise on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text()
    if proc.returncode != 0:
        raise TorchrunError(f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n--- last output ---\n{text[-6000:]}")
    return text


def run_trainer_jobs(jobs: dict[str, list[str]], nproc: int, workdir: Path, timeout: float = 900) -> dict[str, Path]:
    """Train every job (name -> trainer argv) in one torchrun; returns name -> dump folder.

    Each job's dump folder is ``workdir/name`` (its ``metrics.jsonl`` and ``tb/``).
    """
    folders = {name: workdir / name for name in jobs}
    spec = [{"name": n, "argv": [*argv, "--job.dump_folder", str(folders[n])]} for n, argv in jobs.items()]
    spec_file = workdir / "jobs.json"
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=1))
    torchrun([str(JOBS_DRIVER), str(spec_file)], nproc, workdir / "torchrun.log", timeout)
    return folders


def read_metrics(folder: Path) -> list[dict]:
    """The per-step metrics a run logged (``metrics.jsonl``), in step order."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def config(name: str) -> str:
    return str(CONFIGS / f"{name}.toml")

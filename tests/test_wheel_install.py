"""`pip install .` works: from a wheel in a fresh venv, outside the repository, the commands
that read shipped run configs (`describe` on one, `gpu-check --smoke`) run.

The wheel is built from the tracked files (setuptools' PEP 517 backend, in
process) and installed without dependencies into a new venv that sees the
locked environment's site-packages through a ``.pth`` line, so torch is not
reinstalled; that line adds the folder only, not its ``.pth`` files, so the
repository's editable install stays invisible and every ``titan_moe`` import
comes from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.distributed_utils import REPO

pytestmark = pytest.mark.slow  # ~40 s on 2 cores: the gpu-check stage trains and compares two expert layouts


def _run(cmd: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    src, dist = tmp / "src", tmp / "dist"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():  # a file deleted in the working tree but not yet committed is skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(dist)!r})"], src)
    (wheel,) = dist.glob("titan_moe-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp: Path) -> Path:
    venv = tmp / "venv"
    uv = os.environ.get("UV")  # set by `uv run` (python3 run.py test): no pip bootstrap needed
    if uv:
        _run([uv, "venv", "--quiet", "--python", sys.executable, venv], tmp)
    else:
        _run([sys.executable, "-m", "venv", venv], tmp)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    Path(purelib, "locked_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if uv:
        _run([uv, "pip", "install", "--quiet", "--offline", "--no-deps", "--python", python, wheel], tmp)
    else:
        _run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", wheel], tmp)
    return venv


def test_installed_wheel_runs_describe_and_gpu_check_outside_the_repo(tmp_path):
    venv = _venv_with(_build_wheel(tmp_path), tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    titan_moe = venv / "bin" / "titan-moe"

    where = _run([venv / "bin" / "python", "-c", "import titan_moe.configs as c; print(c.__file__); "
                  "print(c.shipped('tiny_moe'))"], elsewhere).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, not the checkout's
    described = _run([titan_moe, "describe", where[1]], elsewhere).stdout
    assert "8 experts x granularity 1/4 (hidden 32), top-4" in described

    report = elsewhere / "gpu_check.json"
    proc = _run([titan_moe, "gpu-check", "--smoke", "--stages", "grouped_vs_loop", "--out", report,
                 "--workdir", elsewhere / "work"], elsewhere)  # fmt: skip
    doc = json.loads(report.read_text())
    assert doc["passed"] and [s["stage"] for s in doc["stages"]] == ["grouped_vs_loop"]
    assert max(doc["stages"][0]["details"]["dropless"].values()) <= 2e-2
    assert "all stages passed" in proc.stdout

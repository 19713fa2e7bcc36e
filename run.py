#!/usr/bin/env python3
"""Set up the pinned environment from a bare machine with Python, then run a job.

    python3 run.py demo          # the main job (see README)
    python3 run.py test [ARGS]   # the test suite; ARGS go to pytest (e.g. -m "not slow")
    python3 run.py test-latest-torch [ARGS]   # the fast lane on the newest supported torch
    python3 run.py -- CMD ...    # any command inside the environment

The environment is ``.venv`` made by uv from ``uv.lock`` (exact versions, so a
fresh machine gets what CI tested).  uv itself is installed with pip if absent.

``test-latest-torch`` tests the other end of the supported torch range: it
syncs ``.venv-torch-latest`` from ``locks/torch-latest/uv.lock`` (this checkout,
editable, on torch LATEST_TORCH) and runs FAST_LANE there; ARGS go to pytest
(e.g. ``-x``, or test paths instead of the lane's).  Both lanes tell the suite
which torch they promise (TITAN_MOE_EXPECT_TORCH), and tests/test_torch_version.py
fails when the environment runs another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LATEST_LOCK = ROOT / "locks" / "torch-latest"
LATEST_ENV = ROOT / ".venv-torch-latest"
# The newest torch titan-moe supports; locks/torch-latest/pyproject.toml pins the same.
LATEST_TORCH = "2.15.0"
EXPECT_TORCH_ENV = "TITAN_MOE_EXPECT_TORCH"
# What depends on torch's version, and so runs on both ends of the range: the model (MoE
# math, compile and graph breaks), the trainer (FSDP2, expert-parallel equivalence, resume
# that continues exactly, teardown), checkpoints, the transformers export, gpu-check --smoke.
FAST_LANE = [
    "tests/test_torch_version.py",
    "tests/test_model_moe.py",
    "tests/test_model_routing.py",
    "tests/test_model_accounting.py",
    "tests/test_model_compile.py",
    "tests/test_trainer_components.py",
    "tests/test_trainer_config.py",
    "tests/test_trainer_distributed.py",
    "tests/test_checkpoint_manager.py",
    "tests/test_moe_ep_capacity.py",
    "tests/test_eval_hf_export.py",
    "tests/test_gpu_check.py",
    # torchrun's SIGTERM handling, which the k8s entrypoint works around (see its docstring).
    "tests/test_k8s_policy.py::test_entrypoint_gives_workers_more_than_torchruns_30s_and_exits_75",
    # The teardown order (titan_moe/trainer/shutdown.py) on the preempted and the crashed exit paths.
    "tests/test_fault_tolerance.py::test_sigterm_to_every_worker_exits_75_without_abort",
    "tests/test_fault_tolerance.py::test_a_crash_after_the_process_group_started_exits_nonzero_without_abort",
]


def uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    try:
        import uv as uv_module  # installed by an earlier run

        return uv_module.find_uv_bin()
    except ImportError:
        pass
    print("run.py: installing uv with pip ...", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "uv"])
    import importlib

    importlib.invalidate_caches()
    import uv as uv_module

    return uv_module.find_uv_bin()


def locked_version(lock: Path, package: str) -> str:
    """``package``'s version in a uv.lock."""
    import tomllib

    for entry in tomllib.loads(lock.read_text())["package"]:
        if entry["name"] == package:
            return entry["version"]
    raise SystemExit(f"run.py: {lock} locks no {package}")


def test_latest_torch(uv_bin: str, rest: list[str]) -> int:
    """Sync .venv-torch-latest from its lock and run the fast lane (or ``rest``'s tests) in it."""
    begin = time.monotonic()
    sync_env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(LATEST_ENV))
    subprocess.check_call([uv_bin, "sync", "--frozen", "--quiet", "--project", str(LATEST_LOCK)], env=sync_env)
    print(f"run.py: {LATEST_ENV.name} synced from {LATEST_LOCK.relative_to(ROOT)}/uv.lock "
          f"in {time.monotonic() - begin:.0f}s", flush=True)
    picks_tests = any(a.startswith("tests") for a in rest)
    # The env's own interpreter and scripts first on PATH, as activating it would.
    env = dict(os.environ, PYTHONUNBUFFERED="1", VIRTUAL_ENV=str(LATEST_ENV), **{EXPECT_TORCH_ENV: LATEST_TORCH})
    env["PATH"] = f"{LATEST_ENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONHOME", None)
    cmd = [str(LATEST_ENV / "bin" / "python"), "-m", "pytest", *([] if picks_tests else FAST_LANE), *rest]
    return subprocess.call(cmd, cwd=ROOT, env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    uv_bin = uv()
    command, rest = argv[0], argv[1:]
    if command == "test-latest-torch":
        return test_latest_torch(uv_bin, rest)
    subprocess.check_call([uv_bin, "sync", "--frozen", "--quiet"], cwd=ROOT)
    if command == "test":
        cmd = ["pytest", *rest]
    elif command == "--":
        cmd = rest
    else:
        cmd = ["titan-moe", command, *rest]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if command == "test":  # the suite's version gate: the torch uv.lock pins
        env.setdefault(EXPECT_TORCH_ENV, locked_version(ROOT / "uv.lock", "torch"))
    return subprocess.call([uv_bin, "run", "--frozen", "--no-sync", *cmd], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

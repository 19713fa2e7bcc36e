#!/usr/bin/env python3
"""Set up the pinned environment from a bare machine with Python, then run a job.

    python3 run.py demo          # the main job (see README)
    python3 run.py test [ARGS]   # the test suite; ARGS go to pytest (e.g. -m "not slow")
    python3 run.py -- CMD ...    # any command inside the environment

The environment is ``.venv`` made by uv from ``uv.lock`` (exact versions, so a
fresh machine gets what CI tested).  uv itself is installed with pip if absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    uv_bin = uv()
    subprocess.check_call([uv_bin, "sync", "--frozen", "--quiet"], cwd=ROOT)
    command, rest = argv[0], argv[1:]
    if command == "test":
        cmd = ["pytest", *rest]
    elif command == "--":
        cmd = rest
    else:
        cmd = ["titan-moe", command, *rest]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.call([uv_bin, "run", "--frozen", "--no-sync", *cmd], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

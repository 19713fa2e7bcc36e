"""The library versions a run computes with, recorded next to what it produces.

titan-moe installs beside torch 2.11 through 2.15 (README "Pinned platform"), and
runs under two torch versions are not bit-comparable: the same seed draws
different initial weights (``nn.init.trunc_normal_`` changed between 2.11 and
2.15), kernels and their reductions differ.  So every checkpoint records these
versions (its COMMITTED marker), a resume under other ones warns, and ``sweep
collect`` puts them in every row and flags a sweep that mixed them.
"""

from __future__ import annotations

from importlib import metadata

import torch

import titan_moe

# The keys, in the order they are reported: what decides the numbers a run computes.
KEYS = ("torch", "torchtitan", "titan_moe")


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def runtime_versions() -> dict[str, str]:
    """This process's versions; torch's keeps its build suffix (``2.11.0+cu130``): builds compute differently too."""
    return {
        "torch": torch.__version__,
        "torchtitan": _distribution_version("torchtitan"),
        "titan_moe": titan_moe.__version__,
    }


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """``"torch 2.11.0+cu130 -> 2.15.0+cu132"`` for each recorded key whose version differs from ``current``."""
    return [
        f"{key} {recorded[key]} -> {current.get(key, 'unknown')}"
        for key in KEYS
        if key in recorded and recorded[key] != current.get(key, "unknown")
    ]

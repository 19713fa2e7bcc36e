"""Preemption-safe distributed checkpoints (see manager.py and catalog.py).

The catalog (which checkpoints a folder holds, which are committed) is
imported eagerly and needs neither torch nor torchtitan; the manager and the
preemption handler are imported on first use, so that a process that only
reads a checkpoint folder -- the Kubernetes entrypoint counting the run's
progress at PID 1 -- does not pay for torchtitan.
"""

from __future__ import annotations

from typing import Any

from titan_moe.checkpoint.catalog import CheckpointInfo, list_checkpoints

_LAZY = {
    "CheckpointLoadError": "titan_moe.checkpoint.manager",
    "CheckpointManager": "titan_moe.checkpoint.manager",
    "PREEMPTED_EXIT_CODE": "titan_moe.checkpoint.preemption",
    "PreemptionHandler": "titan_moe.checkpoint.preemption",
}

__all__ = [
    "CheckpointInfo", "CheckpointLoadError", "CheckpointManager", "PREEMPTED_EXIT_CODE",
    "PreemptionHandler", "list_checkpoints",
]


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)

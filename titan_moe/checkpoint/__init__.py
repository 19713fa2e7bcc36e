"""Preemption-safe distributed checkpoints (see manager.py and catalog.py)."""

from titan_moe.checkpoint.catalog import CheckpointInfo, list_checkpoints
from titan_moe.checkpoint.manager import CheckpointLoadError, CheckpointManager
from titan_moe.checkpoint.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler

__all__ = [
    "CheckpointInfo", "CheckpointLoadError", "CheckpointManager", "PREEMPTED_EXIT_CODE",
    "PreemptionHandler", "list_checkpoints",
]

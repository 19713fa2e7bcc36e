"""The ``[checkpoint]`` rules, checked once: by preflight before any process starts, and
by the CheckpointManager that acts on them (so a manager built alone refuses the same)."""

from __future__ import annotations

from typing import Any

from titan_moe.common.errors import ConfigError

ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")


def check_checkpoint_config(config: Any, *, cuda_available: bool | None = None) -> None:
    """Raise ConfigError naming the ``checkpoint.*`` field; nothing is checked when disabled.

    ``cuda_available = None`` skips the one device-dependent rule (the Kubernetes renderer
    checks a GPU run on a machine without one).
    """
    if not config.enable:
        return
    async_mode = str(config.async_mode).lower()
    if async_mode not in ASYNC_MODES:
        raise ConfigError("checkpoint.async_mode", f"unknown {config.async_mode!r}; choose one of {', '.join(ASYNC_MODES)}")
    if async_mode == "async_with_pinned_mem" and cuda_available is False:
        raise ConfigError("checkpoint.async_mode", "async_with_pinned_mem needs a GPU; use 'async' on CPU")
    if config.keep_latest_k == 1 or config.keep_latest_k < 0:
        raise ConfigError(
            "checkpoint.keep_latest_k",
            f"is {config.keep_latest_k}; it must be 0 (keep all) or >= 2: a job that dies mid-save "
            "needs the previous checkpoint",
        )
    if config.interval <= 0:
        raise ConfigError("checkpoint.interval", f"must be > 0, got {config.interval}")
    if not str(config.folder).strip():
        raise ConfigError("checkpoint.folder", "is empty; name a folder (relative to job.dump_folder) or a URL")
    if config.load_step < -1:
        raise ConfigError("checkpoint.load_step", f"is {config.load_step}; use -1 (the newest) or a step")
    grace = getattr(config, "preemption_grace_seconds", 0.0)
    if grace < 0:
        raise ConfigError("checkpoint.preemption_grace_seconds", f"is {grace}; use seconds >= 0")

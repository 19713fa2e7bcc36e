"""Preemption: SIGTERM sets a flag; the ranks agree on it at a step boundary.

A signal handler may run between any two bytecodes, in the middle of a
collective; so it only records the request.  The trainer asks
``should_stop()`` once per step, which all-reduces the flag so every rank
stops after the same step, then writes a final checkpoint and exits with
``PREEMPTED_EXIT_CODE`` — non-zero, so neither torchrun nor Kubernetes counts
a preempted worker as finished.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again later" — distinct from crashes (1) and from being killed (137).
PREEMPTED_EXIT_CODE = 75


class PreemptionHandler:
    def __init__(self, grace_seconds: float, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.grace_seconds = grace_seconds
        self.requested_at: float | None = None
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()

    def should_stop(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> bool:
        """True on every rank once any rank has been signalled (a collective: call it on all ranks)."""
        local = self.requested_at is not None
        if not dist.is_initialized():
            return local
        flag = torch.tensor([int(local)], device=device or torch.device("cpu"))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and self.requested_at is None:
            self.requested_at = time.monotonic()
        return bool(flag.item())

    def time_left(self) -> float:
        if self.requested_at is None:
            return float("inf")
        return self.grace_seconds - (time.monotonic() - self.requested_at)

    def can_afford_save(self, expected_seconds: float) -> bool:
        """Whether a final save of about ``expected_seconds`` fits in what is left of the grace period."""
        # Keep a margin: SIGKILL arrives on time, not when we finish.
        return self.time_left() > 1.5 * expected_seconds + 1.0

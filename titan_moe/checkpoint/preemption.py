"""Preemption: SIGTERM sets a flag; the ranks agree on it at a step boundary.

A signal handler may run between any two bytecodes, in the middle of a
collective; so it only records the request.  The ranks then agree with one
collective per step that never makes a rank wait (issue: no per-step host
sync):

- at every step boundary each rank *starts* an asynchronous MAX all-reduce of
  its flag on a dedicated CPU/gloo group (a CPU tensor: no device sync, and
  not the checkpoint group, whose background saves must not interleave);
- at the next boundary it collects that result, which has long arrived
  because a whole training step ran in between.

So a request is acted on one step later than it arrived, and every rank sees
the same agreed value at the same boundary: all stop after the same step,
write a final checkpoint and exit with ``PREEMPTED_EXIT_CODE`` -- non-zero, so
neither torchrun nor Kubernetes counts a preempted worker as finished.  The
cost of the extra step is bounded by ``preemption_grace_seconds`` accounting
(``can_afford_save``), which the Kubernetes renderer sets from the pod's
termination grace period.
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
    def __init__(self, grace_seconds: float, signals: tuple[int, ...] = (signal.SIGTERM,),
                 group: dist.ProcessGroup | None = None):
        self.grace_seconds = grace_seconds
        self.requested_at: float | None = None
        self.group = group
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _on_signal(self, signum, frame) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()

    def poll(self) -> bool:
        """At a step boundary, on every rank: True once the ranks have agreed to stop.

        Returns the agreement started at the previous boundary (waiting for it
        costs nothing: a step ran since) and starts the next one.
        """
        local = self.requested_at is not None
        if not dist.is_initialized():
            return local
        agreed = self._collect()
        if agreed:
            if self.requested_at is None:  # a peer was signalled: our grace period runs too
                self.requested_at = time.monotonic()
            return True
        flag = torch.tensor([int(local)], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, flag)
        return False

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag[0])

    def close(self) -> None:
        """Finish the agreement still in flight (every rank started it) before teardown, and
        give the signals back: the installed handler would otherwise keep this object -- and
        its process group with its native threads -- alive into interpreter teardown."""
        self._collect()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        self.group = None

    def time_left(self) -> float:
        if self.requested_at is None:
            return float("inf")
        return self.grace_seconds - (time.monotonic() - self.requested_at)

    def can_afford_save(self, expected_seconds: float) -> bool:
        """Whether a final save of about ``expected_seconds`` fits in what is left of the grace period."""
        # Keep a margin: SIGKILL arrives on time, not when we finish.
        return self.time_left() > 1.5 * expected_seconds + 1.0

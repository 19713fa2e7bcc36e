"""Container entrypoint of a trainer pod: torchrun, with SIGTERM going to the workers only.

    python -m jobs.k8s.entrypoint [torchrun options] -m titan_moe.train [trainer options]

Why not plain ``exec torchrun``: on SIGTERM torchrun forwards the signal to
its workers, SIGKILLs them 30 s later (``PContext.close(timeout=30)``) and exits
1 -- measured on torch 2.11: a worker that needs 45 s to save is killed at 30 s
and the container ends with status 1, whatever the pod's
``terminationGracePeriodSeconds`` and the trainer's exit status.  torch 2.15
only makes the 30 s configurable (``--shutdown-timeout``,
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``; absent in 2.11): it still kills at the
timeout and still exits 1 on SIGTERM (it re-raises its ``SignalException``), so
the pod would still not end with the trainer's 75.  The same code below serves
both ends of the supported range (``--signals-to-handle`` and ``run(args)`` are
unchanged from 2.11 to 2.15; tests/test_k8s_policy.py runs it in both lanes).

So this process, PID 1 of the container, runs torchrun's launcher in-process
with SIGTERM taken out of the signals torchrun handles
(its ``--signals-to-handle``), and on SIGTERM sends SIGTERM to the
worker processes itself (its direct children; not their process groups, so
data-loader workers keep running until the trainer is done with them).  The
workers then have the pod's whole grace period: the trainer finishes its step,
saves within ``checkpoint.preemption_grace_seconds`` (the renderer derives it
from the grace period) and exits 75.  torchrun sees its workers gone and
returns; the container's exit status is the workers' (``exit_status``), so a
preemption ends the pod with 75, which the Job's ``podFailurePolicy`` turns
into a restart that does not count against ``maxRestarts``.

Only Linux (worker processes are found through ``/proc``), which is what a
container is.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

# The trainer's status after a preemption (titan_moe.checkpoint.PREEMPTED_EXIT_CODE).
# Repeated, not imported: importing titan_moe here would pull torchtitan into PID 1.
PREEMPTED_EXIT_CODE = 75
# 128 + signal number, the shell's convention for "ended by a signal".
SIGNAL_EXIT_BASE = 128
# How often a terminating entrypoint looks for workers started after the SIGTERM.
FORWARD_POLL_S = 0.5
# Set by the renderer: tcp | infiniband | efa.
NETWORK_ENV = "TITAN_MOE_NETWORK"
# Set by k8s/Dockerfile: the network libraries the image was built with (--build-arg NETWORK).
IMAGE_NETWORK_ENV = "TITAN_MOE_IMAGE_NETWORK"
# Bad setup, before anything started (the trainer's status for an invalid run config, too).
SETUP_ERROR_EXIT_CODE = 2


def log(message: str) -> None:
    print(f"[entrypoint] {message}", file=sys.stderr, flush=True)


def child_pids(parent: int | None = None) -> list[int]:
    """Live direct children of ``parent`` (default: this process), from /proc."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


class Forwarder:
    """Remembers the SIGTERM and hands it to every worker, including ones that start later."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.signalled: set[int] = set()
        # Re-entrant: a second SIGTERM may land while the handler of the first holds it.
        self._lock = threading.RLock()

    def on_sigterm(self, signum: int, frame: object) -> None:
        first = self.since is None
        if first:
            self.since = time.monotonic()
        sent = self.forward()
        if first:
            to = f"worker(s) {sorted(sent)}" if sent else "no worker yet (it goes to each one as it starts)"
            log(f"SIGTERM: forwarded to {to}; torchrun is left alone, so the workers have the pod's "
                f"whole grace period to save and exit")
            # Workers torchrun is still starting get it too (a worker that starts after
            # this point has not trained a step yet and just exits).
            threading.Thread(target=self._keep_forwarding, daemon=True).start()

    def forward(self) -> set[int]:
        with self._lock:
            sent = set()
            for pid in child_pids():
                if pid in self.signalled:
                    continue
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                self.signalled.add(pid)
                sent.add(pid)
            return sent

    def _keep_forwarding(self) -> None:
        while True:
            time.sleep(FORWARD_POLL_S)
            self.forward()


def exit_status(exitcodes: Iterable[int]) -> int:
    """The container's status from the failed workers' exit codes (torchrun's ProcessFailure.exitcode).

    75 when the workers went through the trainer's preemption path: at least one
    exited 75 and every other one either did too or was ended by a signal
    (torchrun SIGTERMs the rest of a group once one worker has exited, and the
    trainer only exits 75 after every rank passed the barrier that follows the
    final save).  Otherwise the first real failure: its code, or 128 + signal.
    """
    codes = list(exitcodes)
    if PREEMPTED_EXIT_CODE in codes and all(c == PREEMPTED_EXIT_CODE or c < 0 for c in codes):
        return PREEMPTED_EXIT_CODE
    for code in codes:
        if code > 0 and code != PREEMPTED_EXIT_CODE:
            return code
    for code in codes:
        if code < 0:
            return SIGNAL_EXIT_BASE - code
    return 1


def network_mismatch() -> str | None:
    """Why this image cannot serve the rendered network (None if it can).

    An image built without the RDMA libraries would make NCCL fail at init at
    best; say so before any process starts.
    """
    network, image = os.environ.get(NETWORK_ENV, "tcp"), os.environ.get(IMAGE_NETWORK_ENV)
    if image is None or network == "tcp" or image == network:
        return None
    return (f"the manifests ask for --network {network} but the image was built with NETWORK={image}; "
            f"rebuild it with docker build --build-arg NETWORK={network} (k8s/Dockerfile)")


def check_memlock() -> None:
    """RDMA registers pinned memory: a locked-memory limit makes NCCL fail at init, so say it first."""
    network = os.environ.get(NETWORK_ENV, "tcp")
    if network == "tcp":
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY:
        log(f"warning: {NETWORK_ENV}={network} but the locked-memory limit is {soft} bytes, not unlimited; "
            f"RDMA registration may fail: give the container runtime an unlimited memlock ulimit "
            f"(e.g. containerd's LimitMEMLOCK=infinity, the default on the EKS/GKE/AKS GPU images)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    forwarder = Forwarder()
    signal.signal(signal.SIGTERM, forwarder.on_sigterm)
    problem = network_mismatch()
    if problem:
        log(f"error: {problem}")
        return SETUP_ERROR_EXIT_CODE
    check_memlock()

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    # torchrun registers its handlers when it starts the workers; SIGTERM stays ours.
    args.signals_to_handle = ",".join(
        s.strip() for s in args.signals_to_handle.split(",") if s.strip() not in ("", "SIGTERM")
    )
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        status = exit_status(f.exitcode for _, f in failures)
        codes = ", ".join(f"rank {rank}: {f.exitcode}" for rank, f in failures)
        if status == PREEMPTED_EXIT_CODE:
            log(f"workers stopped for preemption ({codes}); exiting {status}")
        else:
            log(f"workers failed ({codes}); exiting {status}\n{exc}")
        return status
    if forwarder.since is not None:
        log("SIGTERM arrived but the workers finished the run; exiting 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())

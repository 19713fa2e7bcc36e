"""Container entrypoint of a trainer pod: torchrun, with SIGTERM going to the workers only.

    python -m jobs.k8s.entrypoint [torchrun options] -m jobs.k8s.worker titan_moe.train [trainer options]

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
returns; the container's exit status says what happened (``exit_status``,
codes in ``exitcodes.py``): 75 preempted, 76 a peer pod vanished, 78 a rank of
this pod failed -- each a restart of the group that does not use up
``maxRestarts`` (the Job's ``podFailurePolicy`` and the JobSet's
``failurePolicy``).  What bounds restarts instead is progress: before starting
torchrun the entrypoint counts this attempt in the run's progress budget
(``attempts.py``) and exits 77, which fails the JobSet, after too many
attempts in a row without a new committed checkpoint.

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
from collections.abc import Callable, Iterable
from pathlib import Path

from jobs.k8s.attempts import Budget
from jobs.k8s.exitcodes import (
    CRASH_LOOP,
    IMAGE_NETWORK_ENV,
    NETWORK_ENV,
    PEER_LOST,
    PREEMPTED,
    RANK_FAILED,
    SETUP_ERROR,
)

# How often a terminating entrypoint looks for workers started after the SIGTERM.
FORWARD_POLL_S = 0.5


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
    """Remembers the SIGTERM and hands it to every worker, including ones that start later.

    Python runs signal handlers in the main thread only, between bytecodes, and
    torchrun's rendezvous can hold the main thread inside C++ for minutes (a
    node waiting for pod 0's store, up to ``--join-timeout``): measured, a
    SIGTERM there was handled only when the wait gave up.  So the Python-level
    handler does nothing, and the C-level one writes the signal number to a
    wakeup pipe that a thread of its own watches.

    A SIGTERM that finds no worker (the pod is still importing torch, checking
    its budget or waiting at the rendezvous) has nothing to save: the pod
    exits 75 at once, instead of sitting out the grace period until the
    kubelet's SIGKILL.  ``on_early_stop`` runs first (the budget forgives the
    attempt).
    """

    def __init__(self) -> None:
        self.since: float | None = None
        self.signalled: set[int] = set()
        self.workers_seen = False
        self.on_early_stop: Callable[[], None] = lambda: None
        self._lock = threading.RLock()

    def install(self) -> None:
        read, write = os.pipe()
        os.set_blocking(write, False)  # required by set_wakeup_fd: a signal handler must never block
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), daemon=True).start()

    def _watch(self, read: int) -> None:
        while True:
            if signal.SIGTERM in os.read(read, 64):  # one byte per signal: its number
                self.on_sigterm()

    def on_sigterm(self) -> None:
        with self._lock:
            first = self.since is None
            if first:
                self.since = time.monotonic()
            sent = self.forward()
            if not first:
                return
            if not sent and not self.workers_seen:
                log(f"SIGTERM before any worker started: nothing to save, exiting {PREEMPTED}")
                self.on_early_stop()
                os._exit(PREEMPTED)
        log(f"SIGTERM: forwarded to worker(s) {sorted(sent)}; torchrun is left alone, so the workers "
            f"have the pod's whole grace period to save and exit")
        # Workers torchrun is still starting get it too (a worker that starts after
        # this point has not trained a step yet and just exits).
        threading.Thread(target=self._keep_forwarding, daemon=True).start()

    def forward(self) -> set[int]:
        with self._lock:
            sent = set()
            for pid in child_pids():
                self.workers_seen = True
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


def exit_status(exitcodes: Iterable[int], sigterm: bool = False) -> int:
    """The container's status from the failed workers' exit codes (torchrun's ProcessFailure.exitcode).

    A worker's code is its own failure unless it is 75 (the trainer's preemption
    path), 76 (``jobs.k8s.worker``: it lost the connection to a peer) or -15 (a
    SIGTERM: torchrun stops the rest of a group once one worker has exited, and
    the entrypoint forwards the kubelet's).  Then:

    * any own failure (an exit code, or a signal such as the OOM killer's
      SIGKILL) -> 78, this rank failed;
    * else, when the pod got a SIGTERM or a worker stopped for a preemption
      (workers killed by the forwarded SIGTERM while still importing, before the
      trainer's handler existed, included) -> 75;
    * else -> 76, every worker here was healthy and lost a peer.
    """
    codes = list(exitcodes)
    not_own = (PREEMPTED, PEER_LOST, -signal.SIGTERM)
    if not codes or any(c not in not_own for c in codes):
        return RANK_FAILED
    if sigterm or PREEMPTED in codes:
        return PREEMPTED
    return PEER_LOST


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
    forwarder.install()
    problem = network_mismatch()
    if problem:
        log(f"error: {problem}")
        return SETUP_ERROR
    check_memlock()
    budget = Budget.from_env()
    if budget is None:
        log("no progress budget configured (not a rendered JobSet pod): crash loops are not detected")
    else:
        forwarder.on_early_stop = budget.forgive
        step, earlier = budget.start()
        log(f"attempt {budget.attempt} starts at committed step {step}; {len(earlier)} earlier attempt(s) "
            f"ended there without progress (crash-loop limit {budget.limit})")
        if budget.exhausted(earlier):
            log(f"crash loop: attempts {', '.join(earlier)} all ended without a new committed checkpoint "
                f"(limit {budget.limit}); not starting again, exiting {CRASH_LOOP}. Fix the cause, then "
                f"delete {budget.record} and re-create the JobSet")
            return CRASH_LOOP
    status = run_torchrun(argv, forwarder)
    if status == PREEMPTED and budget is not None:
        budget.forgive()
    return status


def run_torchrun(argv: list[str], forwarder: Forwarder) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from jobs.k8s.worker import lost_peer

    args = torchrun.parse_args(argv)
    # torchrun registers its handlers when it starts the workers; SIGTERM stays ours.
    args.signals_to_handle = ",".join(
        s.strip() for s in args.signals_to_handle.split(",") if s.strip() not in ("", "SIGTERM")
    )
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        status = exit_status((f.exitcode for _, f in failures), sigterm=forwarder.since is not None)
        codes = ", ".join(f"rank {rank}: {f.exitcode}" for rank, f in failures)
        what = {PREEMPTED: "stopped for preemption", PEER_LOST: "lost a peer (another pod vanished)",
                RANK_FAILED: "failed"}[status]
        log(f"workers {what} ({codes}); exiting {status}" + ("" if status == PREEMPTED else f"\n{exc}"))
        return status
    except Exception as exc:
        # The agent itself failed: the rendezvous store reset or never answered means pod 0 is gone.
        if not lost_peer(exc):
            raise
        log(f"rendezvous lost ({type(exc).__name__}: {exc}); exiting {PEER_LOST}")
        return PEER_LOST
    if forwarder.since is not None:
        log("SIGTERM arrived but the workers finished the run; exiting 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())

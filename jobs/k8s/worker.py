"""Each trainer process of a pod: the trainer module, with a lost peer told apart from a failure.

    torchrun ... -m jobs.k8s.worker titan_moe.train [trainer options]

Runs the module as ``__main__`` (exactly what ``-m titan_moe.train`` would do)
and looks at what ends it.  When a pod vanishes -- its node lost, its
container killed -- the ranks on the other pods fail too, with a lost
connection: gloo's "Connection reset by peer" / "Connection closed by peer",
NCCL's "remote process exited or there was a network error", a reset or timed
out rendezvous store.  Those ranks did nothing wrong, so this process exits
``PEER_LOST`` (76) instead of Python's 1, and the entrypoint passes that on;
any other exception propagates unchanged (status 1: this rank failed).

Only the status differs: the traceback is printed either way.
"""

from __future__ import annotations

import re
import runpy
import sys
import traceback

from jobs.k8s.exitcodes import PEER_LOST

# What torch (gloo, NCCL, the TCPStore) says when the other end of a connection went away.
_LOST = re.compile(
    r"connection (reset|closed|refused)( by peer)?|broken pipe|remote process exited|network error"
    r"|socket (timeout|closed)|failed to recv|timed out|timeout",
    re.IGNORECASE,
)


def lost_peer(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it came from) is a lost connection to another process."""
    import torch.distributed as dist

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError, dist.DistNetworkError, dist.DistStoreError)):
            return True
        if isinstance(current, RuntimeError) and _LOST.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m jobs.k8s.worker MODULE [ARGS...]", file=sys.stderr)
        return 2
    module, *args = argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        raise  # the trainer's own status (0, 2, 75, ...)
    except BaseException as exc:  # noqa: BLE001 -- classified, printed, then re-raised or mapped
        if not lost_peer(exc):
            raise
        traceback.print_exc()
        print(f"[worker] lost the connection to a peer ({type(exc).__name__}); exiting {PEER_LOST}",
              file=sys.stderr, flush=True)
        return PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

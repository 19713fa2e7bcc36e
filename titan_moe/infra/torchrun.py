"""The one torchrun command line used to start processes on this machine.

``titan-moe train`` (``titan_moe.launch``), ``titan-moe bench`` and
``titan-moe eval --nproc N`` all spawn their workers through
``torchrun_command`` and ``torchrun_env``, so they share one rendezvous
(``--standalone``: a free port on this host), one console policy (rank 0 only
unless asked) and one thread policy.  Multi-node runs are rendered by
``jobs.k8s.manifests`` with their own rendezvous endpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence


def torchrun_command(module: str, args: Sequence[str], nproc: int, *, max_restarts: int = 0,
                     rank0_output_only: bool = True) -> list[str]:
    """``python -m torch.distributed.run --standalone ... -m MODULE ARGS``, with this interpreter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}"]
    if rank0_output_only:
        cmd += ["--local-ranks-filter", "0"]
    return [*cmd, "-m", module, *args]


def torchrun_env(nproc: int, environ: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The workers' environment: ``environ`` (default: this process's) plus titan-moe's defaults."""
    env = dict(os.environ if environ is None else environ)
    # torchrun would force 1 thread per process; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torch 2.11: restarted workers cannot rejoin a rendezvous store shared with the agent.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env.update(extra)
    return env

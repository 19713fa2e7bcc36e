"""Orderly teardown of a training process: everything the trainer started, in a fixed order.

Why this exists (root cause of "terminate called without an active exception",
exit -6, after the last step of a finished run): torchtitan's
``GarbageCollection`` turns Python's cyclic GC off (``gc.disable()``) for the
whole process, and the trainer sits in reference cycles (its bound methods are
held by the metrics processor, ``train_state=self`` by the checkpointer, the
preemption handler by the SIGTERM handler).  So when ``run()`` returned, the
trainer -- FSDP states, device meshes, optimizer, data loader, TensorBoard
writer -- was still alive (checked with a weak reference), and
``destroy_process_group()`` only dropped the *registry's* references: each
rank still ran the native ``pt_gloo_runloop`` thread of every gloo
communicator (the mesh groups, the checkpoint and preemption groups), and
rank 0 the TCPStore server thread ``pt_tcpstore_uv`` (checked by listing
``/proc/self/task`` after ``main()``).  Those C++ objects were destroyed by the
final collection inside ``Py_FinalizeEx`` -- the abort shows only the main
thread, "<no Python frame>", and an almost empty module table, i.e.
interpreter finalization -- in arbitrary order, while the peer rank tore down
its side of the same sockets; a ``std::thread`` destroyed there while still
joinable calls ``std::terminate`` -> SIGABRT.  Timing decides, hence about one
launch in 6-15 on a loaded 2-core machine.

The fix is to never leave that work to interpreter finalization:
:func:`shutdown` runs on every exit path (normal end, preemption -> 75,
exception -> non-zero) while the interpreter is fully alive, in this order:

1. the preemption agreement still in flight is collected, and the async
   checkpoint writer joined (its last save committed or reported);
2. validators / in-loop eval and the data loader release their streaming
   resources (shard stores, shared memory, worker threads);
3. the metric writers (TensorBoard, ``metrics.jsonl``) are flushed and closed;
4. the trainer's reference cycles are broken and collected (``gc.collect()``),
   so the model, optimizer and meshes drop their process-group references;
5. on a clean exit, all ranks meet at a barrier (no rank tears down a
   communicator a peer is still using), then the process groups are destroyed
   -- last, because every step above may still need them -- and cyclic GC is
   switched back on.

On an exception the barrier is skipped (a failed peer would never arrive): the
process groups are destroyed locally so the exit is still orderly.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)


def _close(what: str, obj: Any) -> None:
    """Call ``obj.close()``; a failure is logged, never raised (teardown must reach the end)."""
    close = getattr(obj, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as exc:  # noqa: BLE001 - keep tearing down; the run's status is decided elsewhere
        logger.error("shutdown: closing the %s failed: %s: %s", what, type(exc).__name__, exc)


def release_trainer(trainer: Any) -> None:
    """Steps 1-4: join the checkpoint writer, close loaders and writers, free the trainer's objects."""
    if trainer is None:
        return
    state = vars(trainer)
    # Every rank started the last preemption agreement at the same boundary: finish it.
    _close("preemption agreement", state.get("preemption"))
    _close("checkpoint writer", state.get("checkpointer"))
    _close("validator", state.get("validator"))
    _close("data loader", state.get("dataloader"))
    _close("metric writers", state.get("metrics_processor"))
    # Break the cycles (trainer <-> metrics processor, checkpointer, optimizer hooks)
    # and collect now, while every destructor can still run normally.
    state.clear()
    gc.collect()


def destroy_process_groups(clean: bool) -> None:
    """Step 5: meet the other ranks (clean exits only), then destroy every process group."""
    if not dist.is_initialized():
        gc.enable()
        return
    if clean:
        try:
            dist.barrier()
        except Exception as exc:  # noqa: BLE001 - a peer died after its last step; still tear down
            logger.warning("shutdown: final barrier failed (%s); destroying process groups anyway", exc)
    dist.destroy_process_group()
    gc.collect()  # the groups' communicators and the store go now, not in Py_FinalizeEx
    gc.enable()  # torchtitan switched cyclic GC off for the training loop

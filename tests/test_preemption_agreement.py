"""The preemption agreement: overlapped with the next step, and the same boundary on every rank."""

import os
import signal

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from titan_moe.checkpoint.preemption import PreemptionHandler

pytestmark = pytest.mark.slow  # two real gloo processes


def _rank(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        handler = PreemptionHandler(25.0, group=dist.new_group(backend="gloo"))
        answers = []
        for boundary in range(6):
            if rank == 1 and boundary == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled, between boundaries 1 and 2
            stop = handler.poll()
            answers.append(stop)
            if stop:
                break
        handler.close()
        out[rank] = (answers, handler.requested_at is not None, signal.getsignal(signal.SIGTERM))
    finally:
        dist.destroy_process_group()


def test_one_signalled_rank_stops_every_rank_one_boundary_later(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
        result = dict(out)
    # Boundary 2 starts the agreement that carries rank 1's flag; boundary 3 collects it.
    for rank in (0, 1):
        answers, requested, handler_after_close = result[rank]
        assert answers == [False, False, False, True], rank
        assert requested, f"rank {rank}'s grace period runs from the agreement"
        assert handler_after_close == signal.SIG_DFL, "close() gives SIGTERM back"

"""The loader plugged into the real trainer (``training.dataset = "mds"``): resume and validation.

A tiny MoE trains on an MDS prep output under torchrun (2 ranks, gloo):
straight for 6 steps, and stopped after 4 with a torchtitan checkpoint then
resumed to 6 -- on 2 ranks, and on 1 rank with the same global batch.
Per-source validation runs every 3 steps into TensorBoard.
"""

from __future__ import annotations

import shutil

import pytest

from tests.distributed_utils import config, read_metrics, run_trainer_jobs
from tests.mds_streams import write_prep_output

pytestmark = pytest.mark.slow

SEQ = 64  # tiny_moe's [training].seq_len; its vocabulary is 512


def _job(root, val, ckpt=None, steps=6, batch=4) -> list[str]:
    args = ["--job.config_file", config("tiny_moe"), "--training.dataset", "mds",
            "--training.steps", str(steps), "--lr_scheduler.total_steps", "6",
            "--training.local_batch_size", str(batch), "--training.global_batch_size", "8",
            "--data.root", str(root), "--data.mixture_window", "16", "--data.shuffle_block", "16",
            "--validation.enable", "--data.validation_root", str(val), "--validation.freq", "3",
            "--validation.local_batch_size", "2"]
    if ckpt is not None:
        args += ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.folder", str(ckpt),
                 "--checkpoint.no-last-save-model-only"]
    return args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("loader_trainer")
    root = write_prep_output(work / "mix", {"a": 30, "b": 10}, seq_len=SEQ, vocab=512, last_valid={"b": 40})
    val = write_prep_output(work / "val", {"a": 5, "b": 3}, seq_len=SEQ, vocab=512)
    two = run_trainer_jobs({
        "straight": _job(root, val),
        "first4": _job(root, val, work / "ckpt", steps=4),
        "resumed6": _job(root, val, work / "ckpt"),
    }, nproc=2, workdir=work / "two")
    # The 2-rank run as it stood after step 4, resumed on 1 rank (local batch 8: same global batch).
    shutil.copytree(work / "ckpt" / "step-4", work / "ckpt_dp1" / "step-4")
    one = run_trainer_jobs({"resumed6_dp1": _job(root, val, work / "ckpt_dp1", batch=8)},
                           nproc=1, workdir=work / "one")
    return two, one


def _losses(folder) -> dict[int, float]:
    return {r["step"]: r["loss_metrics/global_avg_loss"] for r in read_metrics(folder) if "loss_metrics/global_avg_loss" in r}


def test_resumed_training_sees_the_same_data(runs):
    two, one = runs
    straight, first, resumed = (_losses(two[n]) for n in ("straight", "first4", "resumed6"))
    assert list(straight) == [1, 2, 3, 4, 5, 6] and list(resumed) == [5, 6]
    assert [first[s] for s in range(1, 5)] == [straight[s] for s in range(1, 5)]
    assert [resumed[s] for s in (5, 6)] == [straight[s] for s in (5, 6)]
    # On one rank with the same global batch: same samples, other reduction order.
    dp1 = _losses(one["resumed6_dp1"])
    assert list(dp1) == [5, 6]
    assert [dp1[s] for s in (5, 6)] == pytest.approx([straight[s] for s in (5, 6)], rel=1e-4)


def test_validation_loss_per_source_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    two, _ = runs
    scalars = {}
    for events in (two["straight"]).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    for name in ("a", "b"):
        steps = [s for s, _ in scalars[f"validation_metrics/loss/{name}"]]
        assert steps == [1, 3, 6]
    # Training lowers the held-out loss of the mixture.
    overall = dict(scalars["validation_metrics/loss"])
    assert overall[6] < overall[1]

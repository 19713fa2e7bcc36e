"""Datasets written by llm-foundry's converters (``[data] format = "llm-foundry"``)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed_utils import config, read_metrics, run_trainer_jobs
from tests.mds_streams import decode_ids, sample_tokens, write_foundry_output
from tests.test_loader_streams import SEQ, base_job, job, read  # noqa: F401  (fixture)
from titan_moe.data.setup import plan_data
from titan_moe.data.loader import build_streaming_dataloader
from titan_moe.common.errors import ConfigError


def test_int32_and_bytes_folders_train_as_two_sources(base_job, tmp_path):  # noqa: F811
    root = tmp_path / "foundry"
    write_foundry_output(root / "c4", 9, seq_len=SEQ, source_index=0)  # ndarray:int32
    write_foundry_output(root / "old", 3, seq_len=SEQ, source_index=1, encoding="bytes")  # int64 bytes
    cfg = job(base_job, tmp_path, root, format="llm-foundry")
    plan = plan_data(cfg).train.plan  # the pre-launch check understands the layout too
    assert [(s.name, s.samples, s.per_epoch) for s in plan.sources] == [("c4", 9, 9), ("old", 3, 3)]
    loader = build_streaming_dataloader(1, 0, None, cfg)
    batches = read(loader, 3)  # one epoch
    loader.close()
    seen = []
    for inputs, labels in batches:
        for row, (source, sample) in enumerate(decode_ids(inputs)):
            seen.append((source, sample))
            expected = sample_tokens(source, sample, SEQ)
            assert inputs[row].tolist() == expected.tolist()
            # Every token is real (no num_valid column): only the last label is masked.
            assert labels[row].tolist() == expected[1:].tolist() + [-100]
    assert sorted(seen) == [(0, i) for i in range(9)] + [(1, i) for i in range(3)]


def test_one_folder_is_one_source_and_seq_len_must_match(base_job, tmp_path):  # noqa: F811
    folder = write_foundry_output(tmp_path / "train", 4, seq_len=SEQ + 8)
    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, folder, format="llm-foundry"))
    assert loader.source_names == ["train"]
    with pytest.raises(ConfigError, match=rf"training.seq_len: is {SEQ} but sample \d of stream 'train' holds "
                                          rf"{SEQ + 8} tokens; set training.seq_len = {SEQ + 8}"):
        read(loader, 1)
    loader.close()


def test_a_titan_moe_root_is_not_read_as_foundry(base_job, tmp_path):  # noqa: F811
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data.root: .* holds no index.json nor subfolders with one"):
        plan_data(job(base_job, tmp_path, tmp_path / "empty", format="llm-foundry"))
    with pytest.raises(ConfigError, match=r"data.format: 'mosaic' is not a format"):
        plan_data(job(base_job, tmp_path, tmp_path / "empty", format="mosaic"))


@pytest.mark.slow
def test_trainer_trains_on_an_llm_foundry_int32_dataset(tmp_path):
    """The real trainer (torchrun, 2 ranks, gloo) on a foundry folder: the loss falls, steps are all there."""
    root = tmp_path / "foundry"
    for i, split in enumerate(("a", "b")):
        write_foundry_output(root / split, 24, seq_len=64, source_index=i, vocab=512)  # tiny_moe: seq 64, vocab 512
    argv = ["--job.config_file", config("tiny_moe"), "--training.dataset", "mds", "--training.steps", "8",
            "--lr_scheduler.total_steps", "8", "--training.local_batch_size", "4", "--training.global_batch_size", "8",
            "--data.root", str(root), "--data.format", "llm-foundry", "--data.mixture_window", "16",
            "--data.shuffle_block", "16"]
    folders = run_trainer_jobs({"foundry": argv}, nproc=2, workdir=tmp_path / "run")
    losses = {r["step"]: r["loss_metrics/global_avg_loss"] for r in read_metrics(folders["foundry"])
              if "loss_metrics/global_avg_loss" in r}
    assert list(losses) == list(range(1, 9))
    assert all(np.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1]

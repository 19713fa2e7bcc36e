"""Exact resume of the streaming loader on 2 real ranks (torchrun, gloo), and DP-degree changes.

One torchrun runs every mixture setting on 2 ranks: an uninterrupted run, a
run stopped after step S with its loader state saved through DCP (as
torchtitan's checkpointer does), and fresh loaders restored from it.  This
test process then restores the same 2-rank checkpoints on 1 rank, with the
same and with a different global batch, and checks validation sums against a
1-rank evaluation.  The slow variant resumes in fresh processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from torchtitan.components.loss import cross_entropy_loss

from tests.distributed_utils import torchrun
from tests.loader_dist_worker import VALIDATOR_STEP, TinyLM, read_steps
from tests.mds_streams import decode_ids, write_prep_output
from titan_moe.data.loader import build_streaming_dataloader
from titan_moe.data.validation import build_validation_loaders, evaluate_sources
from titan_moe.run_config.job_config import parse_run_config

WORKER = Path(__file__).resolve().parent / "loader_dist_worker.py"
SEQ = 32
SOURCES = {"a": 60, "b": 24, "c": 12}  # 96 samples: a natural epoch is 24 steps of 2 ranks x 2
VALIDATION = {"a": 7, "b": 5}
LAST_VALID = {"c": 10, "b": 20}
# name: ([data] lines, steps N, stop S).  Every resume (steps S+1..N) crosses an epoch
# (natural/proportions: epoch = 24 steps; repeat: 57 steps) or a budget end (25 steps).
SETTINGS = {
    "natural": ([], 30, 22),
    "proportions": (["mixture = {a = 0.5, b = 0.3, c = 0.2}"], 30, 22),
    "repeat": (["repeat = {a = 3, c = 2}"], 60, 55),
    "repeat_budget": (["repeat = {a = 2}", f"token_budget = {100 * SEQ}"], 30, 12),
}


def write_config(path: Path, root: Path, val: Path, cache: Path, data_lines: list[str], batch: int = 2) -> Path:
    path.write_text("\n".join([
        "[job]", f'dump_folder = "{path.parent}"',
        "[training]", f"seq_len = {SEQ}", f"local_batch_size = {batch}",
        "[validation]", "local_batch_size = 2",
        "[data]", f'root = "{root}"', f'validation_root = "{val}"', f'local_cache = "{cache}"',
        "shuffle_seed = 5", "mixture_window = 16", "shuffle_block = 8", *data_lines,
    ]) + "\n")
    return path


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("loader_dist")
    root = write_prep_output(work / "mix", SOURCES, seq_len=SEQ, shard_bytes=1024, last_valid=LAST_VALID)
    val = write_prep_output(work / "val", VALIDATION, seq_len=SEQ, shard_bytes=1024, last_valid={"b": 9})
    settings = {}
    for name, (lines, steps, stop) in SETTINGS.items():
        config = write_config(work / f"{name}.toml", root, val, work / "cache" / name, lines)
        settings[name] = {"config": str(config), "steps": steps, "stop": stop}
    (work / "settings.json").write_text(json.dumps(settings))
    torchrun([str(WORKER), str(work), "run"], 2, work / "run.log")
    return work, json.loads((work / "run.json").read_text())


def global_steps(per_rank: list[list[dict]]) -> list[list[tuple[int, int]]]:
    """Per step, the global batch: rank 0's samples then rank 1's."""
    return [[tuple(i) for rank in step for i in rank["ids"]] for step in zip(*per_rank)]


def test_resume_sees_exactly_the_uninterrupted_samples(two_rank_run):
    _, results = two_rank_run
    for name, (_, steps, stop) in SETTINGS.items():
        full, resumed = results[name]["full"], results[name]["resumed"]
        expected_steps = 25 if name == "repeat_budget" else steps  # the budget ends the run
        assert [len(r) for r in full] == [expected_steps] * 2, name
        for rank in range(2):
            tail = full[rank][stop:]
            assert [s["ids"] for s in resumed[rank]] == [s["ids"] for s in tail], (name, rank)
            assert [s["hash"] for s in resumed[rank]] == [s["hash"] for s in tail], (name, rank)
            # A loader that silently restarted would replay the first steps: they differ.
            assert [s["ids"] for s in full[rank][: len(tail)]] != [s["ids"] for s in tail], name
        # The two ranks never read the same sample at the same step.
        for step in global_steps(full):
            assert len(step) == 4


def test_orders_have_the_planned_content(two_rank_run):
    _, results = two_rank_run
    natural = [i for step in global_steps(results["natural"]["full"]) for i in step]
    every = sorted((s, i) for s, n in enumerate(sorted(SOURCES)) for i in range(SOURCES[n]))
    assert sorted(natural[:96]) == every  # one epoch: each sequence exactly once
    assert sorted(natural[96:]) != sorted(natural[:24])  # the next epoch is reshuffled
    repeat = [i for step in global_steps(results["repeat"]["full"]) for i in step][:228]
    counts = {k: repeat.count(k) for k in set(repeat)}
    assert {k: counts[k] for k in every} == {k: {0: 3, 1: 1, 2: 2}[k[0]] for k in every}


def test_resume_on_one_rank_continues_the_same_global_order(two_rank_run, tmp_path):
    work, results = two_rank_run
    root, val = work / "mix", work / "val"
    for name, (lines, _steps, stop) in SETTINGS.items():
        expected = [i for step in global_steps(results[name]["full"])[stop:] for i in step]
        for batch in (4, 2):  # same global batch as the 2-rank run, and half of it
            config = write_config(tmp_path / f"{name}{batch}.toml", root, val, tmp_path / "cache", lines, batch)
            loader = build_streaming_dataloader(1, 0, None, parse_run_config(["--job.config_file", str(config)]))
            dcp.load({"dataloader": loader}, checkpoint_id=str(work / "ckpt" / name))
            seen = []
            for _, (inputs, _labels) in zip(range(len(expected) // batch), loader):
                seen += decode_ids(inputs["input"])
            loader.close()
            assert seen == expected, (name, batch)


def test_validation_sums_do_not_depend_on_the_dp_degree(two_rank_run, tmp_path):
    work, results = two_rank_run
    config = write_config(tmp_path / "v.toml", work / "mix", work / "val", tmp_path / "cache", [])
    loaders = build_validation_loaders(1, 0, parse_run_config(["--job.config_file", str(config)]))
    one_rank = evaluate_sources(TinyLM(), loaders, cross_entropy_loss)
    next(iter(loaders.values())).store.close()
    two_ranks = results["validation"]
    # Every label counted once: (num_valid - 1) per sample, whatever the padding rows.
    tokens = {n: (c - 1) * (SEQ - 1) + ({"b": 9}.get(n, SEQ) - 1) for n, c in VALIDATION.items()}
    assert {n: v[1] for n, v in one_rank.items()} == tokens
    assert {n: v[1] for n, v in two_ranks.items()} == tokens
    for name in VALIDATION:
        assert two_ranks[name][0] == pytest.approx(one_rank[name][0], rel=1e-5)
        assert 5 < one_rank[name][0] / tokens[name] < 40  # a real, per-token cross-entropy

    # The torchtitan hookup (validator + MetricsProcessor on 2 ranks) logged the same losses.
    scalars = tensorboard_scalars(work / "validator")
    for name in VALIDATION:
        assert scalars[f"validation_metrics/loss/{name}"] == [
            (VALIDATOR_STEP, pytest.approx(one_rank[name][0] / tokens[name], rel=1e-5))
        ]
    overall = sum(v[0] for v in one_rank.values()) / sum(tokens.values())
    assert scalars["validation_metrics/loss"] == [(VALIDATOR_STEP, pytest.approx(overall, rel=1e-5))]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_resume_in_fresh_processes(two_rank_run):
    work, results = two_rank_run
    torchrun([str(WORKER), str(work), "resume"], 2, work / "resume.log")
    fresh = json.loads((work / "resume.json").read_text())
    for name, (_, _steps, stop) in SETTINGS.items():
        for rank in range(2):
            assert fresh[name]["resumed"][rank] == results[name]["full"][rank][stop:], (name, rank)


def test_read_steps_records_ids_and_hashes(tmp_path):
    # The worker's recorder is what the tests compare: make sure it sees distinct steps.
    root = write_prep_output(tmp_path / "mix", {"a": 8}, seq_len=SEQ)
    config = write_config(tmp_path / "r.toml", root, root, tmp_path / "cache", [])
    loader = build_streaming_dataloader(1, 0, None, parse_run_config(["--job.config_file", str(config)]))
    steps = read_steps(loader, 4)
    loader.close()
    assert len({s["hash"] for s in steps}) == 4
    assert sorted(tuple(i) for s in steps for i in s["ids"]) == [(0, i) for i in range(8)]

"""Real multi-process training on CPU (torchrun, gloo): FSDP2, expert parallelism, aux losses, metrics.

Four torchrun sessions are shared by the tests (session fixtures):

- ``two_rank_runs``: 2 processes training, back to back, a 20-step MoE run and
  the EP=1/EP=2 pairs (homogeneous and heterogeneous+generalist, dropless and
  capacity) and the DP=2 aux-loss runs;
- ``one_rank_runs``: the same aux-loss runs on 1 process;
- ``four_rank_runs``: FSDP, HSDP and dp2ep layouts on 4 processes;
- the dense 20-step run, started through ``titan-moe train --nproc 2``.
"""

import glob
import os
import subprocess
import sys

import pytest

from tests.distributed_utils import REPO, config, read_metrics, run_trainer_jobs, torchrun
from titan_moe.model.accounting import describe
from titan_moe.run_config.job_config import load_run_config
from titan_moe.model.args import TitanMoEModelArgs

pytestmark = pytest.mark.slow

EP_STEPS = 4
CASES = [(cfg, routing) for cfg in ("tiny_moe", "tiny_moe_hetero") for routing in ("dropless", "capacity")]
NO_TB = ["--metrics.no-enable-tensorboard"]
# Large balancing weights so the aux terms visibly move the gradient.
AUX = ["--job.config_file", config("tiny_moe"), "--training.steps", "3", "--moe.aux_loss_weight", "1.0",
       "--moe.z_loss_weight", "0.1", *NO_TB]
REPLICATED = ["--synthetic.replicate_across_dp"]


def _ep_job(cfg: str, routing: str, ep: int) -> list[str]:
    return ["--job.config_file", config(cfg), "--training.steps", str(EP_STEPS), "--moe.routing", routing,
            # capacity 1.0 of a 4-expert top-1 set drops tokens whenever the load is uneven
            "--moe.capacity_factor", "1.0", "--parallelism.expert_parallel_degree", str(ep), *NO_TB]


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory):
    jobs = {"moe20": ["--job.config_file", config("tiny_moe"), "--training.steps", "20", "--metrics.peak_tflops", "0.5"]}
    for cfg, routing in CASES:
        for ep in (1, 2):
            jobs[f"{cfg}-{routing}-ep{ep}"] = _ep_job(cfg, routing, ep)
    # Full activation checkpointing recomputes the forward (and EP's all-to-alls) in backward.
    jobs["tiny_moe_hetero-dropless-ep2-ac"] = _ep_job("tiny_moe_hetero", "dropless", 2) + [
        "--activation_checkpoint.mode", "full"]
    jobs["aux_dp2_replicated"] = AUX + REPLICATED
    jobs["aux_dp2"] = AUX
    # Checkpoint after 4 of 6 steps, then a new Trainer resumes from it (same LR schedule).
    workdir = tmp_path_factory.mktemp("two_rank")
    resume = _ep_job("tiny_moe_hetero", "dropless", 2) + [
        "--lr_scheduler.total_steps", "6", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--checkpoint.folder", str(workdir / "checkpoints"), "--checkpoint.no-last-save-model-only"]
    jobs["ckpt_straight6"] = _ep_job("tiny_moe_hetero", "dropless", 2) + ["--lr_scheduler.total_steps", "6",
                                                                           "--training.steps", "6"]
    jobs["ckpt_first4"] = resume + ["--training.steps", "4"]
    jobs["ckpt_resumed6"] = resume + ["--training.steps", "6"]
    return run_trainer_jobs(jobs, nproc=2, workdir=workdir)


@pytest.fixture(scope="session")
def one_rank_runs(tmp_path_factory):
    jobs = {
        "aux_dp1_replicated": AUX + REPLICATED,
        "noaux_dp1_replicated": AUX + REPLICATED + ["--moe.aux_loss_weight", "0", "--moe.z_loss_weight", "0"],
        # local batch 4, global 8: two accumulated microbatches = the two ranks of aux_dp2
        "aux_dp1_accum2": AUX + ["--training.global_batch_size", "8"],
    }
    return run_trainer_jobs(jobs, nproc=1, workdir=tmp_path_factory.mktemp("one_rank"))


@pytest.fixture(scope="session")
def four_rank_runs(tmp_path_factory):
    # Set 0 shrunk to 2 experts: with EP 2 over 4 ranks its experts are FSDP-sharded on dim 1.
    base = ["--job.config_file", config("tiny_moe_hetero"), "--training.steps", "3", "--training.local_batch_size", "2",
            "--moe.expert_sets.0.num_experts", "2", *NO_TB]
    jobs = {
        "fsdp4": base,
        "fsdp4_ep2": base + ["--parallelism.expert_parallel_degree", "2"],
        "hsdp2x2": base + ["--parallelism.data_parallel_replicate_degree", "2"],
        "hsdp2x2_ep2": base + ["--parallelism.data_parallel_replicate_degree", "2",
                               "--parallelism.expert_parallel_degree", "2"],
    }
    return run_trainer_jobs(jobs, nproc=4, workdir=tmp_path_factory.mktemp("four_rank"))


@pytest.fixture(scope="session")
def dense_launch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    cmd = [sys.executable, "-m", "titan_moe.cli", "train", config("tiny_dense"), "--nproc", "2",
           "--log-all-ranks", "--job.dump_folder", str(folder)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return folder


def _losses(folder) -> list[float]:
    return [r["loss_metrics/global_avg_loss"] for r in read_metrics(folder)]


def _assert_learns(losses: list[float]) -> None:
    assert len(losses) == 20
    start, end = losses[0], sum(losses[-3:]) / 3
    # The toy language's unigram skew alone is worth > 0.5 nats within 20 steps.
    assert end < start - 0.5, f"loss did not fall: {start:.3f} -> {end:.3f} ({losses})"


def test_fsdp_dense_learns_launched_with_titan_moe_train(dense_launch):
    _assert_learns(_losses(dense_launch))


def test_fsdp_moe_learns(two_rank_runs):
    _assert_learns(_losses(two_rank_runs["moe20"]))


@pytest.mark.parametrize("cfg,routing", CASES)
def test_expert_parallel_matches_ep1(two_rank_runs, cfg, routing):
    ep1, ep2 = read_metrics(two_rank_runs[f"{cfg}-{routing}-ep1"]), read_metrics(two_rank_runs[f"{cfg}-{routing}-ep2"])
    assert [r["step"] for r in ep1] == [r["step"] for r in ep2] == list(range(1, EP_STEPS + 1))
    for key in ("loss_metrics/global_avg_loss", "loss/lm", "loss/aux_balance", "loss/z", "grad_norm"):
        for a, b in zip(ep1, ep2):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
    # Same routing decisions: identical global loads, drops and biases.
    for key in ep1[-1]:
        if key.startswith("moe/"):
            assert ep1[-1][key] == pytest.approx(ep2[-1][key], rel=1e-5, abs=1e-6), key
    dropped = max(v for k, v in ep1[-1].items() if k.endswith("/dropped_fraction"))
    if routing == "capacity":
        assert dropped > 0, "capacity_factor 1.0 should drop some token-slots"
    else:
        assert dropped == 0


@pytest.mark.parametrize("layout", ["fsdp4_ep2", "hsdp2x2", "hsdp2x2_ep2"])
def test_hsdp_and_dp2ep_layouts_match_fsdp(four_rank_runs, layout):
    ref, other = read_metrics(four_rank_runs["fsdp4"]), read_metrics(four_rank_runs[layout])
    assert len(ref) == len(other) == 3
    for a, b in zip(ref, other):
        for key in ("loss_metrics/global_avg_loss", "grad_norm", "loss/aux_balance"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])


def test_activation_checkpointing_changes_nothing(two_rank_runs):
    plain = read_metrics(two_rank_runs["tiny_moe_hetero-dropless-ep1"])
    ac = read_metrics(two_rank_runs["tiny_moe_hetero-dropless-ep2-ac"])
    for a, b in zip(plain, ac):
        for key in ("loss_metrics/global_avg_loss", "grad_norm", "moe/layer1.set1/load_imbalance"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])


def test_resume_from_checkpoint_continues_exactly(two_rank_runs):
    """Model, optimizer, LR schedule, expert biases and the data position all come back."""
    straight = read_metrics(two_rank_runs["ckpt_straight6"])
    first = read_metrics(two_rank_runs["ckpt_first4"])
    resumed = read_metrics(two_rank_runs["ckpt_resumed6"])
    assert [r["step"] for r in resumed] == [5, 6]
    assert [r["loss_metrics/global_avg_loss"] for r in first] == [r["loss_metrics/global_avg_loss"] for r in straight[:4]]
    for a, b in zip(straight[4:], resumed):
        for key in ("loss_metrics/global_avg_loss", "grad_norm", "moe/layer0.set1/bias_range"):
            assert a[key] == b[key], (key, a["step"])


def test_aux_loss_weight_does_not_depend_on_dp_degree(one_rank_runs, two_rank_runs):
    dp1 = read_metrics(one_rank_runs["aux_dp1_replicated"])
    dp2 = read_metrics(two_rank_runs["aux_dp2_replicated"])
    noaux = read_metrics(one_rank_runs["noaux_dp1_replicated"])
    # Every rank sees the samples DP=1 sees: the same gradient iff the aux term is weighted
    # by the rank's token share (unweighted, DP=2 would count it twice).
    for a, b in zip(dp1, dp2):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-6)
        assert a["loss_metrics/global_avg_loss"] == pytest.approx(b["loss_metrics/global_avg_loss"], rel=1e-6)
    aux_effect = abs(dp1[0]["grad_norm"] - noaux[0]["grad_norm"])
    assert aux_effect > 1e-3, "the aux terms should change the gradient for this test to mean anything"
    assert abs(dp1[0]["grad_norm"] - dp2[0]["grad_norm"]) < aux_effect / 100


def test_aux_loss_weight_does_not_depend_on_grad_accumulation(one_rank_runs, two_rank_runs):
    accum = read_metrics(one_rank_runs["aux_dp1_accum2"])
    dp2 = read_metrics(two_rank_runs["aux_dp2"])
    assert len(accum) == len(dp2) == 3
    for a, b in zip(accum, dp2):
        for key in ("loss_metrics/global_avg_loss", "loss/lm", "loss/aux_balance", "loss/z", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-6), (key, a["step"])


def _tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(str(folder / "tb" / "*"))
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_has_moe_metrics(two_rank_runs):
    folder = two_rank_runs["moe20"]
    tb = _tensorboard(folder)
    for tag in ("loss_metrics/global_avg_loss", "loss/lm", "loss/aux_balance", "loss/z", "lr", "grad_norm",
                "throughput(tps)", "throughput/global_tokens_per_s", "mfu(%)", "tflops"):
        assert [s for s, _ in tb[tag]] == list(range(1, 21)), tag
    per_set = [f"moe/layer{layer}.set0/{m}" for layer in (0, 1)
               for m in ("load_imbalance", "dropped_fraction", "bias_range", "aux_loss", "z_loss")]
    for tag in per_set:
        assert len(tb[tag]) == 20, tag

    values = {tag: dict(points) for tag, points in tb.items()}
    for step in range(1, 21):
        total = values["loss_metrics/global_avg_loss"][step]
        parts = values["loss/lm"][step] + values["loss/aux_balance"][step] + values["loss/z"][step]
        assert total == pytest.approx(parts, abs=1e-5)
        for layer in (0, 1):
            imbalance = values[f"moe/layer{layer}.set0/load_imbalance"][step]
            assert imbalance >= 1.0 and imbalance <= 8.0  # max/mean of 8 experts' loads
            # Loss-free balancing moves each bias by +-0.001 per step (then re-centres).
            assert 0 < values[f"moe/layer{layer}.set0/bias_range"][step] <= 2 * 0.001 * step + 1e-6
            assert values[f"moe/layer{layer}.set0/dropped_fraction"][step] == 0.0
    # Warm-up over 2 steps to lr 3e-3: step 1 trains at half of it.
    assert values["lr"][1] == pytest.approx(1.5e-3)
    assert values["lr"][2] == pytest.approx(3e-3)

    # MFU and TFLOP/s come from the model's FLOPs per token at [training].seq_len.
    args = TitanMoEModelArgs.from_job_config(load_run_config(config("tiny_moe")))
    flops = describe(args, 64)["flops_per_token"]
    for step in (5, 20):
        tps = values["throughput(tps)"][step]
        assert values["tflops"][step] == pytest.approx(flops * tps / 1e12, rel=1e-4)
        assert values["mfu(%)"][step] == pytest.approx(100 * flops * tps / 0.5e12, rel=1e-4)  # --metrics.peak_tflops


def test_tensorboard_dense_run(dense_launch):
    tb = _tensorboard(dense_launch)
    assert not [t for t in tb if t.startswith("moe/")]
    total, lm = dict(tb["loss_metrics/global_avg_loss"]), dict(tb["loss/lm"])
    assert len(total) == 20
    for step in total:
        assert total[step] == pytest.approx(lm[step], abs=1e-6)


def test_bad_expert_parallel_degree_fails_before_process_group(tmp_path):
    log = tmp_path / "torchrun.log"
    with pytest.raises(AssertionError) as failure:
        torchrun(["-m", "titan_moe.train", "--job.config_file", config("tiny_moe_hetero"),
                  "--parallelism.expert_parallel_degree", "2", "--moe.expert_sets.0.num_experts", "3",
                  "--job.dump_folder", str(tmp_path)], 2, log, timeout=300)
    text = log.read_text()
    assert "moe.expert_sets[0].num_experts: 3 experts cannot be split evenly over expert_parallel_degree 2" in text
    # Rejected by the preflight check: no mesh was built, no Trainer started.
    assert "Building device mesh" not in text and "Starting job" not in text, str(failure.value)[-2000:]

"""Trainer parts that need no process group: synthetic data, EP permutation, MoE step metrics."""

import json
import numpy as np
import pytest
import torch

from titan_moe.data.synthetic import SyntheticConfig, SyntheticDataLoader
from titan_moe.infra.expert_parallel import expert_major_order
from titan_moe.trainer.metrics import MoEStepStats, load_metrics, set_tag

VOCAB, SEQ = 512, 16


def loader(rank=0, world=1, batch=4, **cfg) -> SyntheticDataLoader:
    return SyntheticDataLoader(vocab_size=VOCAB, seq_len=SEQ, local_batch_size=batch, dp_rank=rank,
                               dp_world_size=world, config=SyntheticConfig(**cfg))


def take(dl, n):
    it = iter(dl)
    return [next(it) for _ in range(n)]


def test_synthetic_labels_are_next_tokens_of_the_toy_language():
    (inputs, labels), = take(loader(), 1)
    tokens = inputs["input"]
    assert tokens.shape == labels.shape == (4, SEQ) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    # Every bigram is one of the grammar's successors of its first token.
    succ = loader().language.successors
    for row_in, row_lab in zip(tokens.numpy(), labels.numpy()):
        for a, b in zip(row_in, row_lab):
            assert b in succ[a]
    assert tokens.min() >= 0 and tokens.max() < VOCAB


def test_synthetic_global_batch_is_the_same_for_any_dp_degree():
    one = take(loader(world=1, batch=4), 3)
    ranks = [take(loader(rank=r, world=2, batch=2), 3) for r in (0, 1)]
    for step in range(3):
        merged = torch.cat([ranks[0][step][1], ranks[1][step][1]])
        assert torch.equal(one[step][1], merged)


def test_synthetic_resume_and_reshard():
    straight = take(loader(rank=1, world=2, batch=2), 4)
    first = loader(rank=1, world=2, batch=2)
    take(first, 3)
    state = first.state_dict()
    assert state == {"samples_consumed": 12, "seed": 0}
    resumed = loader(rank=1, world=2, batch=2)
    resumed.load_state_dict(state)
    assert torch.equal(take(resumed, 1)[0][1], straight[3][1])
    # The same checkpoint read by a single rank: the next global batch, whole.
    single = loader(world=1, batch=4)
    single.load_state_dict(state)
    expected = torch.cat([take(loader(rank=r, world=2, batch=2), 4)[3][1] for r in (0, 1)])
    assert torch.equal(take(single, 1)[0][1], expected)


def test_synthetic_replicated_ranks_and_seed_checks():
    a, b = (take(loader(rank=r, world=2, batch=2, replicate_across_dp=True), 2) for r in (0, 1))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(take(loader(seed=1), 1)[0][1], take(loader(seed=0), 1)[0][1])
    dl = loader(seed=1)
    with pytest.raises(ValueError, match="synthetic.seed"):
        dl.load_state_dict({"samples_consumed": 4, "seed": 0})
    with pytest.raises(ValueError, match="training.local_batch_size"):
        loader(batch=3).load_state_dict({"samples_consumed": 4, "seed": 0})


def test_synthetic_unigram_is_skewed():
    tokens = np.concatenate([b[1].numpy().ravel() for b in take(loader(batch=8), 8)])
    counts = np.sort(np.bincount(tokens, minlength=VOCAB))[::-1]
    # Zipf-like: the 10 most frequent of 512 tokens carry far more than 10/512 of the mass.
    assert counts[:10].sum() / counts.sum() > 0.15


def test_expert_major_order_by_hand():
    # counts[source, local expert]; rows arrive as s0e0 | s0e1 s0e1 | s1e0 s1e0 s1e0 | s1e1
    counts = torch.tensor([[1, 2], [3, 1]])
    perm = expert_major_order(counts, 7)
    assert perm.tolist() == [0, 3, 4, 5, 1, 2, 6]
    assert expert_major_order(torch.zeros(2, 3, dtype=torch.int64), 0).numel() == 0


def _stats(aux, z, dropped):
    return {"aux_loss": torch.tensor(aux), "z_loss": torch.tensor(z), "dropped_fraction": torch.tensor(dropped)}


def test_moe_step_stats_are_token_weighted():
    stats = MoEStepStats()
    # Two microbatches with 1/4 and 3/4 of the global tokens; 2 layers x 1 set.
    for share, aux, z, lm in ((0.25, (1.0, 3.0), (2.0, 4.0), 1.5), (0.75, (2.0, 2.0), (1.0, 1.0), 3.0)):
        moe = {
            "layers.0._checkpoint_wrapped_module.moe.sets.0": _stats(aux[0], z[0], 0.1),
            "layers.1.moe.sets.0": _stats(aux[1], z[1], 0.3),
        }
        stats.add_microbatch(torch.tensor(lm), moe, torch.tensor(share), aux_loss_weight=0.01, z_loss_weight=0.001)
    out = stats.reduce(group=None)
    assert out["loss/lm"] == pytest.approx(4.5)  # lm terms arrive already divided by global tokens
    # per microbatch: mean over layers of the set sums; then token-weighted
    assert out["loss/aux_balance"] == pytest.approx(0.01 * (0.25 * 2.0 + 0.75 * 2.0))
    assert out["loss/z"] == pytest.approx(0.001 * (0.25 * 3.0 + 0.75 * 1.0))
    assert out["loss/aux_total"] == pytest.approx(out["loss/aux_balance"] + out["loss/z"])
    assert out["moe/layer0.set0/aux_loss"] == pytest.approx(0.25 * 1.0 + 0.75 * 2.0)
    assert out["moe/layer1.set0/dropped_fraction"] == pytest.approx(0.3)


def test_moe_metrics_reach_the_host_in_one_transfer(monkeypatch):
    """Sums and already-global values (load imbalance) come back from one ``.tolist()``."""
    stats = MoEStepStats()
    stats.add_microbatch(torch.tensor(2.0), {"layers.0.moe.sets.0": _stats(1.0, 2.0, 0.5)}, torch.tensor(1.0),
                         aux_loss_weight=0.1, z_loss_weight=0.01)
    loads = {"layers.0.moe.sets.0": torch.tensor([1.0, 5.0, 2.0, 0.0])}
    extra = load_metrics(loads, {}, bias_on=False)
    transfers = []
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: transfers.append("tolist") or real_tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: transfers.append("item") or real_item(t))
    out = stats.reduce(group=None, global_values=extra)
    assert transfers == ["tolist"]
    assert out["moe/layer0.set0/load_imbalance"] == pytest.approx(5.0 / 2.0)
    assert out["loss/aux_balance"] == pytest.approx(0.1 * 1.0) and out["loss/lm"] == pytest.approx(2.0)


def test_load_metrics_and_tags():
    assert set_tag("layers.12.moe.sets.3") == "layer12.set3"
    loads = {"layers.0.moe.sets.0": torch.tensor([1.0, 3.0, 2.0, 2.0])}
    biases = {"layers.0.moe.sets.0": torch.tensor([-0.1, 0.2, 0.0, -0.1])}
    out = {k: float(v) for k, v in load_metrics(loads, biases, bias_on=True).items()}
    assert out == pytest.approx({"moe/layer0.set0/load_imbalance": 1.5, "moe/layer0.set0/bias_range": 0.3})
    assert "moe/layer0.set0/bias_range" not in load_metrics(loads, biases, bias_on=False)


def test_jsonl_resume_drops_records_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    from titan_moe.trainer.metrics import JsonlLogger

    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(str(path))
    for step in range(1, 6):
        log.log({"loss": float(step)}, step)
    log.file.write('{"step": 6, "lo')  # a kill -9 in the middle of a write
    log.file.flush()
    log.resume_at(3)  # the restart resumes from step-3: 4, 5 and the torn 6 were never checkpointed
    log.log({"loss": 40.0}, 4)
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 40.0

"""Capacity policies, z-loss normalisation, width padding and the sync-free hot path, by hand."""

import math

import pytest
import torch

from tests.distributed_utils import config
from tests.model_configs import model_args
from titan_moe.gpu_check import count_sync_ops
from titan_moe.run_config.job_config import load_run_config
from titan_moe.model.args import ExpertSetArgs, MoEArgs, TitanMoEModelArgs
from titan_moe.model.experts import _experts_grouped_mm, _experts_loop, pad_groups
from titan_moe.model.moe import ExpertSet
from titan_moe.model.transformer import Transformer

PROBS = [0.9, 0.7, 0.8, 0.2]  # P(expert 0) per token; 2 experts


def expert_set(n=2, k=1, policy="priority", routing="capacity", cf=1.0, grouped=False, dim=2, hidden=3, **moe):
    args = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(n, 1, k)], routing=routing, capacity_factor=cf,
                   capacity_policy=policy, **moe)
    torch.manual_seed(0)
    s = ExpertSet(dim=dim, hidden_dim=hidden, num_experts=n, top_k=k, moe=args, use_grouped_mm=grouped)
    s.init_weights(0.5, None)
    return s


def two_expert_tokens(s):
    with torch.no_grad():
        s.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # P(expert 0) = sigmoid(x0)
    return torch.tensor([[math.log(p / (1 - p)), 0.3 * (i + 1)] for i, p in enumerate(PROBS)])


# T = 4 tokens, k = 2, n = 3, capacity_factor 0.75: capacity 2 under both policies
# (priority ceil(0.75 * 4 * 2 / 3) = 2, megablocks int(0.75 * 2 * 4 * 1 / 3) = 2).
# slot s = 2 t + j:      s0   s1   s2   s3    s4   s5   s6   s7
SLOT_EXPERT = torch.tensor([0, 1, 0, 2, 0, 1, 1, 0])
SLOT_WEIGHT = torch.tensor([0.5, 0.3, 0.4, 0.35, 0.6, 0.3, 0.3, 0.45])


@pytest.mark.parametrize("policy, kept", [
    # expert 0 (s0 .5, s2 .4, s4 .6, s7 .45) keeps s4, s0; expert 1 (s1, s5, s6 all .3) keeps the
    # earlier s1, s5; expert 2 keeps s3.
    ("priority", [1, 1, 0, 1, 1, 1, 0, 0]),
    # position order: expert 0 keeps s0, s2; expert 1 keeps s1, s5; expert 2 keeps s3.
    ("megablocks", [1, 1, 1, 1, 0, 1, 0, 0]),
])
def test_which_slots_each_policy_keeps_by_hand(policy, kept):
    s = expert_set(n=3, k=2, policy=policy, cf=0.75)
    assert s.capacity(4) == 2
    selected = torch.tensor([4, 3, 1])
    keep = s.keep_mask(SLOT_EXPERT, SLOT_WEIGHT, selected, num_tokens=4)
    assert keep.int().tolist() == kept
    dropped_fraction = 1 - keep.float().mean().item()
    assert dropped_fraction == pytest.approx(3 / 8)


@pytest.mark.parametrize("policy, cf, capacity, zero_tokens, dropped", [
    # experts chosen [0, 0, 0, 1]; priority capacity ceil(1 * 4 / 2) = 2 drops the 0.7 slot (token 1),
    # megablocks int(1 * 1 * 4 / 2) = 2 drops the latest one (token 2).
    ("priority", 1.0, 2, [1], 0.25),
    ("megablocks", 1.0, 2, [2], 0.25),
    # capacity_factor 0.6: priority ceil(1.2) = 2 as above; megablocks int(1.2) = 1 keeps token 0 and 3 only.
    ("priority", 0.6, 2, [1], 0.25),
    ("megablocks", 0.6, 1, [1, 2], 0.5),
    # megablocks' capacity int(0.4) = 0 means no limit (megablocks falls back to the largest load).
    ("megablocks", 0.2, 0, [], 0.0),
])
def test_capacity_policies_drop_the_hand_computed_tokens(policy, cf, capacity, zero_tokens, dropped):
    for grouped in (False, True):
        s = expert_set(policy=policy, cf=cf, grouped=grouped)
        x = two_expert_tokens(s)
        out = s(x)
        assert s.capacity(4) == capacity
        assert [t for t in range(4) if torch.count_nonzero(out[t]) == 0] == zero_tokens
        assert s.last_stats["dropped_fraction"].item() == pytest.approx(dropped)
        assert s.last_stats["load"].tolist() == [3, 1]  # load counts selections before drops


def test_z_loss_normalisations_by_hand():
    lse = [math.log(1 + p / (1 - p)) for p in PROBS]  # logits [x0, 0]: logsumexp = log(1 + e^x0)
    for normalization, k, denominator in (("tokens", 1, 4), ("tokens", 2, 4), ("tokens_topk", 2, 8)):
        s = expert_set(k=k, routing="dropless", z_loss_normalization=normalization)
        s(two_expert_tokens(s))
        assert s.last_stats["z_loss"].item() == pytest.approx(sum(v * v for v in lse) / denominator, rel=1e-6)


def _fwd_bwd(s, x):
    x = x.clone().requires_grad_()
    out = s(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in s.parameters()]


@pytest.mark.parametrize("routing, policy", [("dropless", "priority"), ("capacity", "priority"),
                                             ("capacity", "megablocks")])
def test_grouped_and_loop_expert_sets_agree_with_gradients(routing, policy):
    # Dropped slots sit past the last group: their rows must get zero output and zero gradient.
    results = []
    for grouped in (False, True):
        s = expert_set(n=6, k=2, policy=policy, routing=routing, cf=0.7, grouped=grouped, dim=8, hidden=12)
        torch.manual_seed(1)
        results.append(_fwd_bwd(s, torch.randn(40, 8)))
        if routing == "capacity":
            assert s.last_stats["dropped_fraction"] > 0
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, dim, hidden, row_align", [
    (torch.float32, 6, 21, 1),   # 16-byte rows: widths padded to 8 and 24
    (torch.float32, 6, 21, 8),   # ... and groups padded to 8 rows, as on CUDA
    (torch.bfloat16, 16, 12, 8),  # bf16: hidden 12 padded to 16
])
def test_misaligned_expert_widths_are_padded_with_unchanged_results(dtype, dim, hidden, row_align):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 9, 1])
    x = torch.randn(15, dim, dtype=dtype, requires_grad=True)  # 2 rows past the last group
    ws = [torch.randn(4, hidden, dim), torch.randn(4, dim, hidden), torch.randn(4, hidden, dim)]
    results = []
    for fn in (_experts_loop, lambda *a: _experts_grouped_mm(*a, row_align=row_align)):
        x.grad = None
        w = [t.to(dtype).requires_grad_() for t in ws]
        out = fn(*w, x, counts)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach().float(), x.grad.float(), [t.grad.float() for t in w]))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    (o1, gx1, gw1), (o2, gx2, gw2) = results
    assert o2.shape == (15, dim) and torch.count_nonzero(o2[13:]) == 0 and torch.count_nonzero(gx2[13:]) == 0
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(gx1, gx2, **tol)
    for a, b in zip(gw1, gw2):
        assert a.shape == b.shape  # gradients of the real (unpadded) parameters
        torch.testing.assert_close(a, b, **tol)


def test_pad_groups_places_rows_past_the_last_group_after_every_padded_group():
    x = torch.arange(6.0).view(6, 1)
    padded, padded_counts, rows = pad_groups(x, torch.tensor([1, 3]), align=4)
    assert padded_counts.tolist() == [4, 4]
    assert rows.tolist() == [0, 4, 5, 6, 8, 9]  # the 2 trailing rows go behind row 8
    assert padded[rows].flatten().tolist() == x.flatten().tolist()


@pytest.mark.parametrize("moe", [
    {"routing": "dropless"},
    {"routing": "capacity", "capacity_factor": 0.8, "capacity_policy": "priority"},
    {"routing": "capacity", "capacity_factor": 0.8, "capacity_policy": "megablocks"},
])
def test_grouped_moe_forward_backward_has_no_host_sync_ops(moe):
    # On CPU nothing can wait for a device; count the ops that would make a GPU wait
    # (.item()/.tolist(), nonzero, bincount, boolean masks, repeat_interleave without output_size).
    section = {"enabled": True, "expert_sets": [{"num_experts": 8, "granularity": "1/4", "top_k": 2}],
               "expert_impl": "grouped", **moe}
    model = Transformer(model_args(section))
    model.init_weights()
    tokens = torch.randint(0, 300, (2, 16))
    syncs = count_sync_ops(lambda: (model(tokens).float().sum() + model.moe_aux_loss()).backward())
    assert syncs == {}
    # The counter does see them: the loop experts split by host counts (one .tolist() per
    # layer), and the old bincount counts.
    loop = Transformer(model_args(section | {"expert_impl": "loop"}))
    loop.init_weights()
    assert count_sync_ops(lambda: loop(tokens).sum().backward()) == {"Tensor.tolist": 2}
    assert count_sync_ops(lambda: (torch.bincount(tokens.flatten(), minlength=300), tokens[tokens > 5],
                                   tokens.sum().item())) == {
        "aten.bincount": 1, "aten.index (boolean mask)": 1, "aten._local_scalar_dense": 1}


def test_routing_options_reach_the_expert_sets_from_the_command_line():
    job = load_run_config(config("tiny_moe"), ["--moe.routing", "capacity", "--moe.capacity_policy", "megablocks",
                                               "--moe.z_loss_normalization", "tokens_topk"])
    model = Transformer(TitanMoEModelArgs.from_job_config(job))
    s = model.layers["0"].moe.sets[0]
    assert (s.routing, s.capacity_policy, s.z_loss_normalization) == ("capacity", "megablocks", "tokens_topk")

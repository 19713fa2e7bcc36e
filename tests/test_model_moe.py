"""MoE layer behaviour against hand-computed routing and losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from titan_moe.model.args import ExpertSetArgs, MoEArgs
from titan_moe.model.experts import FeedForward, GroupedExperts, _experts_grouped_mm, _experts_loop, pad_groups
from titan_moe.model.moe import ExpertSet, MoE, update_expert_biases


def logit(p):
    return math.log(p / (1 - p))


PROBS = [0.9, 0.7, 0.8, 0.2]  # P(expert 0) per token; 2 experts, so P(expert 1) = 1 - p


def two_expert_set(routing="dropless", capacity_factor=1.0, top_k=1, renormalize=False, bias_rate=0.0):
    moe = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(2, 1, top_k)], routing=routing,
                  capacity_factor=capacity_factor, renormalize=renormalize, bias_update_rate=bias_rate)
    torch.manual_seed(0)
    s = ExpertSet(dim=2, hidden_dim=3, num_experts=2, top_k=top_k, moe=moe, use_grouped_mm=False)
    s.experts.init_weights(0.5)
    with torch.no_grad():
        # logits = [x0, 0]: softmax gives P(expert 0) = sigmoid(x0).
        s.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[logit(p), 0.3 * i] for i, p in enumerate(PROBS)])
    return s, x


def expert_out(s, e, x):
    w1, w2, w3 = s.experts.w1[e], s.experts.w2[e], s.experts.w3[e]
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def test_top1_routing_matches_hand_computation():
    s, x = two_expert_set()
    out = s(x)
    chosen = [0, 0, 0, 1]
    for t, e in enumerate(chosen):
        p = PROBS[t] if e == 0 else 1 - PROBS[t]
        torch.testing.assert_close(out[t], p * expert_out(s, e, x[t]), rtol=1e-5, atol=1e-6)
    assert s.last_stats["load"].tolist() == [3, 1]
    assert s.last_stats["dropped_fraction"].item() == 0.0


def test_capacity_drops_exactly_the_overflow_lowest_probability_first():
    # capacity = ceil(1.0 * 4 tokens * k=1 / 2 experts) = 2; expert 0 is picked by
    # tokens 0, 1, 2 with probabilities 0.9, 0.7, 0.8, so token 1 (0.7) is dropped.
    s, x = two_expert_set(routing="capacity", capacity_factor=1.0)
    assert s.capacity(4) == 2
    out = s(x)
    assert torch.count_nonzero(out[1]) == 0
    torch.testing.assert_close(out[0], 0.9 * expert_out(s, 0, x[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2], 0.8 * expert_out(s, 0, x[2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[3], 0.8 * expert_out(s, 1, x[3]), rtol=1e-5, atol=1e-6)
    assert s.last_stats["dropped_fraction"].item() == pytest.approx(0.25)
    # Load counts what the router selected, before the drop.
    assert s.last_stats["load"].tolist() == [3, 1]


def test_dropless_with_same_routing_drops_nothing():
    s, x = two_expert_set(routing="dropless")
    out = s(x)
    assert s.last_stats["dropped_fraction"].item() == 0.0
    assert torch.count_nonzero(out[1]) > 0


def test_top2_renormalised_weights_sum_to_one_per_token():
    s, x = two_expert_set(top_k=2, renormalize=True)
    out = s(x)
    both = expert_out(s, 0, x) * torch.tensor(PROBS)[:, None] + expert_out(s, 1, x) * (1 - torch.tensor(PROBS))[:, None]
    # With k = n = 2 renormalising is a no-op, and each token mixes both experts by its probabilities.
    torch.testing.assert_close(out, both, rtol=1e-5, atol=1e-6)


def test_aux_and_z_loss_equal_hand_computed_values():
    s, x = two_expert_set()
    s(x)
    f = [3 / 4, 1 / 4]
    p_mean = [sum(PROBS) / 4, sum(1 - p for p in PROBS) / 4]
    aux = 2 * (f[0] * p_mean[0] + f[1] * p_mean[1])  # = 1.15
    assert aux == pytest.approx(1.15)
    z = sum(math.log(1 + math.exp(logit(p))) ** 2 for p in PROBS) / 4
    assert s.last_stats["aux_loss"].item() == pytest.approx(aux, rel=1e-6)
    assert s.last_stats["z_loss"].item() == pytest.approx(z, rel=1e-6)


def test_moe_layer_weights_losses_and_sums_sets():
    moe = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(2, 1, 1)], aux_loss_weight=0.1, z_loss_weight=0.01)
    layer = MoE(dim=2, hidden_dims=[3], generalist_hidden=0, moe=moe, use_grouped_mm=False)
    s, x = two_expert_set()
    layer.sets[0].load_state_dict(s.state_dict())
    layer(x[None])
    expected = 0.1 * layer.sets[0].last_stats["aux_loss"] + 0.01 * layer.sets[0].last_stats["z_loss"]
    torch.testing.assert_close(layer.aux_loss(), expected)


def test_loss_free_bias_balances_load_and_leaves_gate_weights_untouched():
    torch.manual_seed(0)
    moe = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(4, 1, 1)], bias_update_rate=0.01)
    s = ExpertSet(dim=8, hidden_dim=4, num_experts=4, top_k=1, moe=moe, use_grouped_mm=False)
    s.init_weights(0.02, None)
    with torch.no_grad():
        s.router.gate.weight.normal_(0, 1)
        s.router.gate.weight[0] += 0.5  # tokens lean towards expert 0
    x = torch.randn(512, 8)
    gate_before = s.router.gate.weight.clone()
    imbalance = []
    for _ in range(60):
        with torch.no_grad():
            s(x)
        load = s.last_stats["load"].float()
        imbalance.append((load.max() / load.mean()).item())
        update_expert_biases(torch.nn.ModuleList([s]), rate=0.01)
        assert s.tokens_per_expert.sum() == 0  # counters reset after each update
    assert imbalance[0] > 1.3
    assert max(imbalance[-10:]) < 1.05
    assert torch.equal(s.router.gate.weight, gate_before)
    assert abs(s.expert_bias.sum().item()) < 1e-5  # re-centred
    # Gate weights are the unbiased probabilities of the (bias-)selected experts.
    _, probs, weights, experts = s.router(x, s.expert_bias)
    torch.testing.assert_close(weights, probs.gather(-1, experts))
    unbiased_choice = probs.argmax(-1)
    assert (experts[:, 0] != unbiased_choice).any()  # the bias did change some selections


def test_single_expert_equals_dense_ffn():
    torch.manual_seed(0)
    moe = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(1, 1, 1)])
    layer = MoE(dim=16, hidden_dims=[24], generalist_hidden=0, moe=moe, use_grouped_mm=False)
    dense = FeedForward(16, 24)
    dense.init_weights(0.02)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(layer.sets[0].experts, name)[0].copy_(getattr(dense, name).weight)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-6)


def test_grouped_and_loop_experts_agree_forward_and_backward():
    torch.manual_seed(0)
    experts = GroupedExperts(dim=16, hidden_dim=8, num_experts=5, use_grouped_mm=False)
    experts.init_weights(0.02)
    counts = torch.tensor([3, 0, 7, 1, 4])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    results = []
    for fn in (_experts_loop, _experts_grouped_mm):
        x.grad = None
        w = [getattr(experts, n).detach().clone().requires_grad_() for n in ("w1", "w2", "w3")]
        out = fn(*w, x, counts)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), [t.grad for t in w]))
    (o1, gx1, gw1), (o2, gx2, gw2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    for a, b in zip(gw1, gw2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_groups_give_the_same_grouped_result():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 9, 1])
    x = torch.randn(13, 8)
    padded, padded_counts, rows = pad_groups(x, counts, align=8)
    assert padded_counts.tolist() == [8, 0, 16, 8]
    torch.testing.assert_close(padded[rows], x)
    w = [torch.randn(4, 12, 8), torch.randn(4, 8, 12), torch.randn(4, 12, 8)]
    offsets = torch.cumsum(padded_counts, 0, dtype=torch.int32)
    h = F.silu(torch._grouped_mm(padded, w[0].mT, offs=offsets)) * torch._grouped_mm(padded, w[2].mT, offs=offsets)
    out = torch._grouped_mm(h, w[1].mT, offs=offsets)[rows]
    torch.testing.assert_close(out, _experts_loop(*w, x, counts), rtol=1e-5, atol=1e-5)


def test_expert_set_grouped_and_loop_paths_agree_in_capacity_mode():
    moe = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(6, 1, 2)], routing="capacity", capacity_factor=0.8)
    outs = []
    for grouped in (False, True):
        torch.manual_seed(0)
        s = ExpertSet(dim=8, hidden_dim=4, num_experts=6, top_k=2, moe=moe, use_grouped_mm=grouped)
        s.init_weights(0.1, None)
        outs.append((s(torch.randn(40, 8)), s.last_stats["dropped_fraction"]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    assert outs[0][1] == outs[1][1] and outs[0][1] > 0

"""Capacity policies under a real 2-process expert-parallel group (torchrun, gloo): tests/moe_ep_worker.py."""

import json

import pytest

from tests.distributed_utils import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_ep") / "result.json"
    torchrun(["tests/moe_ep_worker.py", str(out)], nproc=2, log=out.with_suffix(".log"), timeout=600)
    return json.loads(out.read_text())


def test_megablocks_counts_capacity_over_the_ep_group_by_hand(ranks):
    # 2 experts, top-1, T = 4 per rank, capacity_factor 1: capacity int(1 * 1 * 4 * 2 / 2) = 4 per
    # expert over both ranks. Expert 0 is chosen by rank 0's tokens 0, 1, 2 and rank 1's tokens 0, 3,
    # in that (rank, position) order, so only rank 1's token 3 (the fifth) is dropped.
    assert [r["megablocks"]["hand"]["capacity"] for r in ranks] == [4, 4]
    assert [r["megablocks"]["hand"]["zero_tokens"] for r in ranks] == [[], [3]]
    assert [r["megablocks"]["hand"]["dropped_fraction"] for r in ranks] == [0.0, 0.25]


def test_priority_decides_on_local_tokens_under_ep_by_hand(ranks):
    # capacity ceil(1 * 4 * 1 / 2) = 2 per expert and rank: rank 0's expert 0 holds 3 slots
    # (p = 0.9, 0.7, 0.8) and drops token 1 (0.7); rank 1 has 2 slots per expert, drops none.
    assert [r["priority"]["hand"]["capacity"] for r in ranks] == [2, 2]
    assert [r["priority"]["hand"]["zero_tokens"] for r in ranks] == [[1], []]
    assert [r["priority"]["hand"]["dropped_fraction"] for r in ranks] == [0.25, 0.0]


@pytest.mark.parametrize("policy", ["priority", "megablocks", "dropless", "megablocks_compiled"])
def test_ep2_equals_the_unsharded_reference(ranks, policy):
    # priority/dropless: the unsharded set on each rank's tokens (EP does not change the
    # decisions); megablocks: on both ranks' tokens at once. Outputs, input gradients and
    # the local experts' weight gradients agree to float32 rounding.
    for r in ranks:
        case = r[policy]["random"]
        assert case["out_diff"] < 1e-6 and case["x_grad_diff"] < 1e-6 and case["expert_grad_diff"] < 1e-6
    if policy != "dropless":  # the capacity cases do drop slots
        assert all(r[policy]["random"]["dropped_fraction"] > 0 for r in ranks)

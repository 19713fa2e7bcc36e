"""A tiny dense and a tiny MoE model overfit one synthetic batch."""

import pytest
import torch
import torch.nn.functional as F

from titan_moe.model import Transformer
from tests.model_configs import HETEROGENEOUS, HOMOGENEOUS, model_args


@pytest.mark.parametrize("moe", [None, HOMOGENEOUS, HETEROGENEOUS], ids=["dense", "moe", "hetero+generalist"])
def test_tiny_model_overfits_a_batch(moe):
    torch.manual_seed(0)
    args = model_args(moe, seq_len=32)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits = model(tokens[:, :-1])
        lm_loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        aux = model.moe_aux_loss()
        loss = lm_loss if aux is None else lm_loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm_loss.item())
    assert losses[0] > 5.0  # ~ln(384) at init
    assert losses[-1] < 0.2 * losses[0]
    if moe:
        stats = model.moe_stats()
        assert set(stats) == {f"layers.{i}.moe.sets.{j}" for i in range(2) for j in range(len(moe["expert_sets"]))}
        assert all(s["load"].sum() == 4 * 32 * k["top_k"] for s, k in zip(stats.values(), moe["expert_sets"] * 2))

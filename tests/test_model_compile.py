"""Whole MoE blocks under torch.compile(fullgraph=True): same numbers as eager, no graph break.

Grouped experts (``torch._grouped_mm`` runs on CPU in torch 2.11, in float32 and
bf16), bf16 parameters, inductor.  Compiled blocks come from the trainer's own
``apply_compile``.
"""

import copy

import pytest
import torch

from tests.model_configs import model_args
from titan_moe.infra.parallelize import apply_compile
from titan_moe.model.transformer import Transformer

ROUTINGS = {
    "dropless": {"routing": "dropless"},
    "capacity": {"routing": "capacity", "capacity_factor": 0.8, "capacity_policy": "priority"},
    "capacity_megablocks": {"routing": "capacity", "capacity_factor": 0.8, "capacity_policy": "megablocks"},
}


def bf16_model(routing: str) -> Transformer:
    section = {"enabled": True, "expert_sets": [{"num_experts": 8, "granularity": "1/4", "top_k": 2}],
               "expert_impl": "grouped", "z_loss_weight": 0.01, **ROUTINGS[routing]}
    torch.manual_seed(0)
    model = Transformer(model_args(section))
    model.init_weights()
    return model.to(torch.bfloat16)


def fwd_bwd(model, tokens):
    logits = model(tokens)
    loss = logits.float().logsumexp(-1).mean() + model.moe_aux_loss()
    loss.backward()
    dropped = [s["dropped_fraction"].item() for s in model.moe_stats().values()]
    grads = {n.replace("._orig_mod", ""): p.grad.float() for n, p in model.named_parameters()}
    return logits.detach().float(), grads, dropped


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_moe_block_traces_without_graph_breaks(routing):
    model = bf16_model(routing)
    h = model.tok_embeddings(torch.randint(0, 300, (2, 16)))
    explained = torch._dynamo.explain(model.layers["0"])(h, model.rope_cos, model.rope_sin)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


# torch 2.15 on CPU: the inductor-compiled backward of bf16 grouped experts gives the first
# block's expert gradients 22-95% off an fp32 eager reference (eager bf16: within 1.5%), the
# outputs and every other gradient agree; torch 2.11 agrees everywhere. Strict, so the lane
# says when a torch release fixes it (README "Pinned platform").
COMPILED_GROUPED_BACKWARD_OFF = torch.torch_version.TorchVersion(torch.__version__) >= (2, 15)


@pytest.mark.slow
@pytest.mark.xfail(COMPILED_GROUPED_BACKWARD_OFF, strict=True,
                   reason="torch 2.15 CPU inductor: compiled bf16 grouped-expert gradients of the first block are off")
@pytest.mark.parametrize("routing", ["dropless", "capacity"])
def test_compiled_moe_decoder_equals_eager_forward_and_backward(routing):
    torch._dynamo.reset()
    eager = bf16_model(routing)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, "inductor")  # every block, fullgraph=True (grouped experts, no EP)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    out_e, grads_e, dropped_e = fwd_bwd(eager, tokens)
    out_c, grads_c, dropped_c = fwd_bwd(compiled, tokens)
    # Same routing decisions (the dropped fractions are exact counts) ...
    assert dropped_c == dropped_e
    if routing == "capacity":
        assert max(dropped_e) > 0
    # ... and bf16-rounding-level differences (inductor fuses differently): at most 2% of the
    # largest magnitude per tensor, outputs and every parameter gradient.
    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    assert rel(out_c, out_e) < 2e-2
    assert set(grads_c) == set(grads_e) and len(grads_e) > 10
    worst = max(rel(grads_c[n], grads_e[n]) for n in grads_e)
    assert worst < 2e-2

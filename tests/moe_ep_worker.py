"""torchrun worker: capacity policies of one expert set under expert parallelism 2 (gloo, CPU).

    torchrun --nproc_per_node 2 tests/moe_ep_worker.py OUT.json

Every rank builds the same expert sets, shards their experts over a real
2-rank EP mesh with ``apply_expert_parallel`` and runs its own tokens
forward and backward.  Rank 0 writes, per case, what each rank measured and
the reference computed without EP in the same process:

- ``hand``: 2 experts (1 per rank), top-1, the routing of the hand-computed
  example in test_model_routing.py: per policy, the dropped fraction and which
  tokens came back as zeros on each rank;
- ``random``: 8 experts, top-2, random tokens; the reference is the unsharded
  set on each rank's tokens separately (``priority``: local decisions) or on
  both ranks' tokens concatenated, rank 0 first (``megablocks``: capacity over
  the EP group).  Max differences of outputs, input gradients and the local
  experts' weight gradients.  Also once under torch.compile (fullgraph=False, as
  under EP the trainer compiles): ``megablocks_compiled``.
"""

import json
import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from titan_moe.infra.expert_parallel import apply_expert_parallel
from titan_moe.trainer import shutdown
from titan_moe.model.args import ExpertSetArgs, MoEArgs
from titan_moe.model.moe import ExpertSet

# P(expert 0) per token on each rank (2 experts, so P(expert 1) = 1 - p).
HAND_PROBS = {0: [0.9, 0.7, 0.8, 0.2], 1: [0.6, 0.3, 0.4, 0.55]}


def build(policy: str, num_experts: int, top_k: int, dim: int, capacity_factor: float, seed: int,
          grouped: bool = True) -> ExpertSet:
    routing = "dropless" if policy == "dropless" else "capacity"
    moe = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(num_experts, 1, top_k)], routing=routing,
                  capacity_factor=capacity_factor, capacity_policy="priority" if policy == "dropless" else policy)
    torch.manual_seed(seed)
    s = ExpertSet(dim=dim, hidden_dim=4, num_experts=num_experts, top_k=top_k, moe=moe, use_grouped_mm=grouped)
    s.init_weights(0.5, None)
    return s


def hand_case(policy: str, rank: int, mesh) -> dict:
    s = build(policy, num_experts=2, top_k=1, dim=2, capacity_factor=1.0, seed=0)
    with torch.no_grad():
        s.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # logits [x0, 0]
    apply_expert_parallel(torch.nn.ModuleList([s]), mesh)
    x = torch.tensor([[math.log(p / (1 - p)), 0.3 * (i + 1)] for i, p in enumerate(HAND_PROBS[rank])])
    out = s(x)
    return {"dropped_fraction": s.last_stats["dropped_fraction"].item(),
            "zero_tokens": [t for t in range(len(x)) if torch.count_nonzero(out[t]) == 0],
            "capacity": s.capacity(len(x))}


def random_case(policy: str, rank: int, mesh, compiled: bool = False) -> dict:
    dim, tokens = 8, 24
    # torch._grouped_mm compiles in bf16 only on CPU: the compiled case uses the loop experts (float32).
    ref = build(policy, num_experts=8, top_k=2, dim=dim, capacity_factor=0.75, seed=1, grouped=not compiled)
    ep = build(policy, num_experts=8, top_k=2, dim=dim, capacity_factor=0.75, seed=1, grouped=not compiled)
    apply_expert_parallel(torch.nn.ModuleList([ep]), mesh)
    run = ep
    if compiled:
        # As apply_compile does under EP: fullgraph=False, dispatch/combine run eager.
        run = torch.compile(ep, backend="aot_eager", fullgraph=False)
    torch.manual_seed(2)
    xs = [torch.randn(tokens, dim) for _ in range(2)]
    grads = [torch.randn(tokens, dim) for _ in range(2)]

    x = xs[rank].clone().requires_grad_()
    out = run(x)
    (out * grads[rank]).sum().backward()

    x_ref = torch.cat(xs).requires_grad_()
    if policy == "megablocks":
        # Capacity over the EP group = the unsharded set on both ranks' tokens, with the
        # same capacity: int(cf * k * T_local * 2 / n) == int(cf * k * (2 T_local) / n).
        out_ref = ref(x_ref)
    else:
        out_ref = torch.cat([ref(x_ref[:tokens]), ref(x_ref[tokens:])])
    (out_ref * torch.cat(grads)).sum().backward()
    rows = slice(rank * tokens, (rank + 1) * tokens)
    local = slice(rank * 4, (rank + 1) * 4)  # this rank's 4 of the 8 experts
    weight_diff = max((getattr(ep.experts, n).grad.to_local() - getattr(ref.experts, n).grad[local]).abs().max().item()
                      for n in ("w1", "w2", "w3"))
    return {"out_diff": (out - out_ref[rows]).abs().max().item(),
            "x_grad_diff": (x.grad - x_ref.grad[rows]).abs().max().item(),
            "expert_grad_diff": weight_diff,
            "dropped_fraction": ep.last_stats["dropped_fraction"].item()}


def main(path: str) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    result = {}
    for policy in ("priority", "megablocks"):
        result[policy] = {"hand": hand_case(policy, rank, mesh), "random": random_case(policy, rank, mesh)}
    result["dropless"] = {"random": random_case("dropless", rank, mesh)}
    result["megablocks_compiled"] = {"random": random_case("megablocks", rank, mesh, compiled=True)}
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(gathered, f, indent=1)
    # The product's teardown (titan_moe/trainer/shutdown.py): nothing that holds a process group may
    # be left for interpreter finalization -- compiled graphs and the mesh hold the EP group.
    del mesh
    torch._dynamo.reset()
    shutdown.destroy_process_groups(clean=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

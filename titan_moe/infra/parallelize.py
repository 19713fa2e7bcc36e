"""Apply expert parallelism, activation checkpointing, torch.compile and FSDP2.

The order matters and follows torchtitan's MoE models:

1. EP: shard every expert set's ``GroupedExperts`` over the ``ep`` mesh
   (``expert_parallel.py``); tokens move with all-to-all.
2. Activation checkpointing per ``TransformerBlock`` (torchtitan's ``apply_ac``).
3. ``torch.compile`` per whole block, MoE blocks included (routing, dispatch,
   grouped GEMM and combine in one graph, ``fullgraph=True``: the MoE code has
   no data-dependent shapes).  Two exceptions compile the block with
   ``fullgraph=False``, each with a documented break: expert parallelism (its
   dispatch/combine need host split sizes and run eager) and the loop experts
   (the off-Hopper path, which splits by host counts).
4. FSDP2 over the data-parallel mesh (HSDP when ``dp_replicate > 1``); with EP
   the routed experts are sharded separately over the ranks left after EP
   (``efsdp``), torchtitan's dp2ep layout.  Gradient division is disabled:
   the trainer divides by the global token count instead.

Only CPU needs one extra call (``platform.adapt_fsdp``), a no-op on GPU.
"""

from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.tools.logging import logger

from titan_moe.infra import platform
from titan_moe.infra.expert_parallel import apply_expert_parallel
from titan_moe.model.moe import expert_sets

# Ops whose outputs per-op selective AC keeps instead of recomputing.
_OP_SAC_SAVE_LIST = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops.aten.max.default,
}


def parallelize_titan_moe(model: nn.Module, parallel_dims: ParallelDims, job_config: Any) -> nn.Module:
    """torchtitan's ``parallelize_fn`` for the titan_moe Transformer."""
    compile_model = job_config.compile.enable and "model" in job_config.compile.components

    if parallel_dims.ep_enabled:
        count = apply_expert_parallel(model, parallel_dims.get_mesh("ep"))
        logger.info(f"Applied expert parallelism (EP={parallel_dims.ep}) to {count} expert sets")

    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=_OP_SAC_SAVE_LIST,
            base_folder=job_config.job.dump_folder,
        )

    if compile_model:
        apply_compile(model, job_config.compile.backend, ep_enabled=parallel_dims.ep_enabled)

    if parallel_dims.fsdp_enabled:
        replicate = parallel_dims.dp_replicate_enabled
        dp_mesh = parallel_dims.get_mesh(["dp_replicate", "fsdp"] if replicate else "fsdp")
        edp_mesh = parallel_dims.get_optional_mesh(["dp_replicate", "efsdp"] if replicate else "efsdp")
        apply_fsdp(
            model,
            dp_mesh,
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            reshard_policy=job_config.parallelism.fsdp_reshard_after_forward,
            cpu_offload=job_config.training.enable_cpu_offload,
            ep_degree=parallel_dims.ep,
            edp_mesh=edp_mesh,
        )
        logger.info(f"Applied {'HSDP' if replicate else 'FSDP'} to the model")
    elif parallel_dims.dp_replicate_enabled:
        # Pure DDP averages gradients on top of the trainer's global-token normalisation.
        raise ValueError("parallelism: pure DDP is not supported; use FSDP or HSDP (see titan_moe.run_config.preflight)")
    return model


def _unwrap(block: nn.Module) -> nn.Module:
    return block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block


def apply_compile(model: nn.Module, backend: str, ep_enabled: bool = False) -> None:
    """Compile each whole block; ``fullgraph=True`` wherever the block has no eager island."""
    for layer_id, block in list(model.layers.named_children()):
        sets = [s for _, s in expert_sets(_unwrap(block))]
        fullgraph = not ep_enabled and all(s.experts.use_grouped_mm for s in sets)
        model.layers.register_module(layer_id, torch.compile(block, backend=backend, fullgraph=fullgraph))
    logger.info("Compiled each TransformerBlock with torch.compile")


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_policy: str = "default",
    cpu_offload: bool = False,
    ep_degree: int = 1,
    edp_mesh: DeviceMesh | None = None,
) -> None:
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    config: dict[str, Any] = {"mesh": dp_mesh, "mp_policy": mp_policy}
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    if reshard_policy not in ("default", "always", "never"):
        raise ValueError(f"parallelism.fsdp_reshard_after_forward: unknown policy {reshard_policy!r}")
    reshard = reshard_policy != "never"

    fully_shard(model.tok_embeddings, **config, reshard_after_forward=reshard)
    blocks = list(model.layers.values())
    experts_of: dict[nn.Module, list[nn.Module]] = {}
    for block in blocks:
        experts_of[block] = []
        if ep_degree > 1:
            assert edp_mesh is not None
            for _, expert_set in expert_sets(block):
                # Few experts per rank: shard each expert's matrices on dim 1 instead of
                # over experts, so every efsdp rank still holds a slice.
                many_ranks = edp_mesh.size(edp_mesh.ndim - 1) * ep_degree > expert_set.num_experts
                fully_shard(
                    expert_set.experts,
                    **(config | {"mesh": edp_mesh}),
                    reshard_after_forward=reshard,
                    shard_placement_fn=(lambda param: Shard(1)) if many_ranks else None,
                )
                experts_of[block].append(expert_set.experts)
        fully_shard(block, **config, reshard_after_forward=reshard)
    # The last norm and LM head are needed right at the start of backward: keep them
    # gathered unless asked to always reshard.
    fully_shard([model.norm, model.output], **config, reshard_after_forward=reshard_policy == "always")
    fully_shard(model, **config)

    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The trainer normalises gradients by the global token count itself.
            module.set_gradient_divide_factor(1.0)
    platform.adapt_fsdp(model)

    if ep_degree > 1:
        _explicit_prefetch(model, blocks, experts_of)


def _explicit_prefetch(model: nn.Module, blocks: list[nn.Module], experts_of: dict) -> None:
    """EP's host syncs (split sizes) stall FSDP's implicit prefetch; prefetch explicitly."""
    if blocks:
        model.tok_embeddings.set_modules_to_forward_prefetch([blocks[0], *experts_of[blocks[0]]])
        model.output.set_modules_to_backward_prefetch([blocks[-1], *experts_of[blocks[-1]]])
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1], *experts_of[blocks[i + 1]]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1], *experts_of[blocks[i - 1]]])

"""The benchmark baseline: torchtitan 0.2.2's own MoE (its qwen3 MoE) at a titan_moe run's shape.

Run under torchrun by ``titan-moe bench`` with the same run config and
arguments as the titan_moe run.  Everything but the model and its
parallelisation is shared, so the comparison is the model itself:

- model: ``torchtitan.models.qwen3.Qwen3Model`` with MoE in every layer, sized
  from ``[arch]``/``[moe]`` (one expert set: ``num_experts`` experts of hidden
  ``granularity * ffn_hidden``, top-k, softmax router, no shared expert, the
  same padded vocabulary, untied head); loss-free balancing when
  ``bias_update_rate > 0``; torch._grouped_mm experts on Hopper GPUs, the
  for-loop experts elsewhere (as titan_moe's "auto");
- parallelize: torchtitan's ``parallelize_qwen3`` (FSDP2, its EP, AC, compile);
- trainer: torchtitan's ``Trainer`` unchanged; data: the same synthetic stream;
  metrics: the same processor (tokens/s, MFU, ``metrics.jsonl``).
"""

from titan_moe.infra import platform

platform.activate()
platform.adapt_torchtitan_moe()

import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torchtitan.components.loss import build_cross_entropy_loss  # noqa: E402
from torchtitan.components.lr_scheduler import build_lr_schedulers  # noqa: E402
from torchtitan.components.optimizer import build_optimizers, build_optimizers_with_moe_load_balancing  # noqa: E402
from torchtitan.models.moe import MoEArgs as TorchTitanMoEArgs  # noqa: E402
from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs, parallelize_qwen3  # noqa: E402
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec  # noqa: E402
from torchtitan.tools.logging import init_logger  # noqa: E402
from torchtitan.train import Trainer  # noqa: E402

from titan_moe.common.errors import ConfigError  # noqa: E402
from titan_moe.run_config.job_config import parse_run_config  # noqa: E402
from titan_moe.model.args import TitanMoEModelArgs  # noqa: E402
from titan_moe.model.transformer import use_grouped_mm_for  # noqa: E402
from titan_moe.run_config.preflight import plan_run  # noqa: E402
from titan_moe.trainer.train_spec import build_dataloader, build_metrics_processor  # noqa: E402

BASELINE_NAME = "qwen3_moe_baseline"


def qwen3_args_for(args: TitanMoEModelArgs) -> Qwen3ModelArgs:
    """torchtitan's qwen3 MoE at the shape of a homogeneous titan_moe design."""
    moe = args.moe
    if not moe.enabled or len(moe.expert_sets) != 1 or moe.generalist_granularity != 0:
        raise ConfigError("moe.expert_sets", "the qwen3 baseline has one routed expert set and no generalist")
    (expert_set,) = moe.expert_sets
    (hidden,) = args.expert_hidden_dims()
    return Qwen3ModelArgs(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.kv_heads,
        vocab_size=args.padded_vocab_size,
        head_dim=args.attn_head_dim,
        hidden_dim=args.ffn_hidden,
        norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        qk_norm=args.qk_norm,
        max_seq_len=args.max_seq_len,
        enable_weight_tying=False,
        moe_enabled=True,
        moe_inter_dim=hidden,
        moe_args=TorchTitanMoEArgs(
            num_experts=expert_set.num_experts,
            num_shared_experts=0,
            score_func="softmax",
            route_norm=moe.renormalize,
            route_scale=1.0,
            score_before_experts=False,
            top_k=expert_set.top_k,
            use_grouped_mm=use_grouped_mm_for(moe.expert_impl),
            load_balance_coeff=moe.bias_update_rate or None,
        ),
    )


def _parallelize(model, parallel_dims, job_config):
    model = parallelize_qwen3(model, parallel_dims, job_config)
    platform.adapt_fsdp(model)  # CPU/gloo only: SUM instead of PREMUL_SUM
    return model


def main(argv: list[str] | None = None) -> int:
    init_logger()
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_run_config(argv)
    args = plan_run(config, int(os.environ.get("WORLD_SIZE", "1"))).model_args
    qwen3_args = qwen3_args_for(args)
    balancing = build_optimizers_with_moe_load_balancing if args.moe.bias_update_rate > 0 else build_optimizers
    register_train_spec(
        BASELINE_NAME,
        TrainSpec(
            model_cls=Qwen3Model,
            model_args={config.model.flavor: qwen3_args},
            parallelize_fn=_parallelize,
            pipelining_fn=None,
            build_optimizers_fn=balancing,
            build_lr_schedulers_fn=build_lr_schedulers,
            build_dataloader_fn=build_dataloader,
            build_tokenizer_fn=None,
            build_loss_fn=build_cross_entropy_loss,
            build_metrics_processor_fn=build_metrics_processor,
        ),
    )
    config.model.name = BASELINE_NAME
    trainer = None
    try:
        trainer = Trainer(config)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

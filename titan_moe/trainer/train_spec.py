"""The ``titan_moe`` TrainSpec: how torchtitan 0.2.2 builds every training component.

=====================  ==========================================================
model                  ``titan_moe.model.Transformer`` from ``[arch]``/``[moe]``
parallelize            ``titan_moe.infra.parallelize.parallelize_titan_moe``
loss                   torchtitan's summed cross-entropy; the trainer adds the MoE
                       auxiliary losses (they need the rank's token share, see
                       ``TitanMoETrainer.forward_backward_step``)
optimizer              torchtitan's AdamW container + a post-step hook that
                       all-reduces expert load and updates the loss-free biases
dataloader             ``synthetic`` (toy language) or ``mds`` (``titan_moe.data``)
validator              per-source loss on ``[data].validation_root`` (``titan_moe.data``);
                       the trainer adds ``[eval]``'s validator (``ValidatorSet``)
metrics                ``titan_moe.trainer.metrics.TitanMetricsProcessor``
=====================  ==========================================================
"""

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.components.validate import BaseValidator
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from titan_moe.data.synthetic import SyntheticDataLoader
from titan_moe.common.errors import ConfigError
from titan_moe.trainer.metrics import TitanMetricsProcessor
from titan_moe.model.accounting import count_parameters, flops_per_token
from titan_moe.model.moe import expert_sets, update_expert_biases
from titan_moe.model.transformer import Transformer
from titan_moe.infra.parallelize import parallelize_titan_moe
from titan_moe.run_config.job_config import MODEL_NAME
from titan_moe.run_config.preflight import planned_model_args


def _json_safe(value: Any) -> Any:
    if isinstance(value, Fraction):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclasses.dataclass
class RunModelArgs(BaseModelArgs):
    """What torchtitan's Trainer holds as "model args" for a titan_moe run.

    torchtitan looks model args up by ``[model].flavor`` and then calls
    ``update_from_config(job_config)``; titan-moe builds them there, from the
    run's own ``[arch]``/``[moe]``/``[training].seq_len``, so the train spec
    needs no per-run state.  The validated ``TitanMoEModelArgs`` is a plain
    attribute (``args``), not a field, because the Trainer logs
    ``json.dumps(dataclasses.asdict(model_args))`` and the expert
    granularities are exact ``Fraction``s; ``summary`` is the JSON-safe copy
    it logs instead.
    """

    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    def update_from_config(self, job_config: Any, **kwargs) -> None:
        # The rank's preflight already built and validated them (titan_moe.run_config.preflight.RunPlan).
        self.args = planned_model_args(job_config)
        self.summary = _json_safe(dataclasses.asdict(self.args))

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        counts = count_parameters(model)
        return counts.total, flops_per_token(self.args, counts, seq_len)


class ModelArgsFromSections(Mapping[str, RunModelArgs]):
    """torchtitan's ``model_args`` table: every flavor maps to fresh ``RunModelArgs``,
    filled from the run config by torchtitan's own ``update_from_config`` call."""

    def __getitem__(self, flavor: str) -> RunModelArgs:
        return RunModelArgs()

    def __iter__(self) -> Iterator[str]:
        return iter(["from_sections"])

    def __len__(self) -> int:
        return 1


def build_model(run_args: RunModelArgs) -> Transformer:
    return Transformer(run_args.args)


# -- optimizer + loss-free balancing ------------------------------------------------


class ExpertLoadBalancer:
    """After each optimizer step: reduce expert loads over all data ranks, update biases.

    The load counters (``ExpertSet.tokens_per_expert``) hold the local token-slot
    counts of every microbatch of the step.  They are summed over the whole
    data-parallel world -- with dp2ep that includes the EP ranks, which route
    different tokens -- so every rank applies the same bias update.  With
    ``bias_update_rate = 0`` the reduction only happens when the trainer wants
    the load for metrics (``want_load``).
    """

    def __init__(self, model_parts: list[nn.Module], parallel_dims: ParallelDims, rate: float):
        self.model_parts = model_parts
        self.parallel_dims = parallel_dims
        self.rate = rate
        self.want_load = False
        self.last_global_load: dict[str, torch.Tensor] = {}

    def __call__(self, *args, **kwargs) -> None:
        mesh = self.parallel_dims.get_optional_mesh("loss")
        reduce = self.rate > 0 or self.want_load
        captured: list[torch.Tensor] = []

        def all_reduce_sum(loads: torch.Tensor) -> torch.Tensor:
            if reduce and mesh is not None:
                dist.all_reduce(loads, group=mesh.get_group())
            captured.append(loads.detach().clone())
            return loads

        for model in self.model_parts:
            update_expert_biases(model, self.rate, all_reduce_sum)
            if self.want_load and captured:
                sets = expert_sets(model)
                loads = torch.split(captured[-1], [s.num_experts for _, s in sets])
                self.last_global_load = {name: load for (name, _), load in zip(sets, loads)}


def build_optimizers_with_bias_update(
    model_parts: list[nn.Module], optimizer_config: Any, parallel_dims: ParallelDims, ft_manager: Any = None
) -> OptimizersContainer:
    optimizers = build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    moe = model_parts[0].args.moe
    if moe.enabled:
        balancer = ExpertLoadBalancer(model_parts, parallel_dims, moe.bias_update_rate)
        optimizers.register_step_post_hook(balancer)
        optimizers.moe_balancer = balancer  # the trainer reads the global load for metrics
    return optimizers


# -- data ------------------------------------------------------------------------


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: Any, **kwargs):
    dataset = job_config.training.dataset
    if dataset == "synthetic":
        return SyntheticDataLoader(
            vocab_size=job_config.arch.vocab_size,
            seq_len=job_config.training.seq_len,
            local_batch_size=job_config.training.local_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            config=job_config.synthetic,
        )
    if dataset == "mds":
        # Imported on use: MosaicML streaming is heavy and the synthetic path does not need it.
        from titan_moe.data.loader import build_streaming_dataloader

        return build_streaming_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs)
    raise ConfigError("training.dataset", f"unknown dataset {dataset!r}; use 'synthetic' or 'mds'")


def build_validator(**kwargs):
    """``[validation]``: per-source validation loss on the MDS ``[data].validation_root``."""
    from titan_moe.data.validation import build_streaming_validator

    return build_streaming_validator(**kwargs)


class ValidatorSet(BaseValidator):
    """Several validators in torchtitan's one validator slot, each on its own schedule."""

    def __init__(self, validators: list[BaseValidator]):
        self.validators = validators

    def should_validate(self, step: int) -> bool:
        return any(v.should_validate(step) for v in self.validators)

    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        for validator in self.validators:
            if validator.should_validate(step):
                validator.validate(model_parts, step)

    def close(self) -> None:
        for validator in self.validators:
            if hasattr(validator, "close"):
                validator.close()


def import_factory(path: str, field: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function; a config error names ``field`` otherwise.

    How downstream packages plug into training without training importing them
    (in-loop eval: ``[eval].validator``), like ``titan-moe``'s command table.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(field, f"{path!r} is not an import path of the form 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(field, f"cannot load {path!r}: {exc}") from exc


def build_metrics_processor(job_config: Any, parallel_dims: ParallelDims, model_args: Any = None, tag=None):
    return TitanMetricsProcessor(job_config, parallel_dims, tag)


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=build_model,
        model_args=ModelArgsFromSections(),
        parallelize_fn=parallelize_titan_moe,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers_with_bias_update,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=None,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
    )


def register() -> None:
    """Register the ``titan_moe`` spec with torchtitan (idempotent: it holds no per-run state)."""
    try:
        register_train_spec(MODEL_NAME, get_train_spec())
    except ValueError:
        pass  # already registered in this process

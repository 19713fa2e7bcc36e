"""Training metrics: the MoE numbers per step, reduced over all ranks, to TensorBoard and the console.

Every log step writes (TensorBoard tags; also ``{dump_folder}/metrics.jsonl``):

- ``loss_metrics/global_avg_loss``: the optimised loss, LM + auxiliary terms;
- ``loss/lm``: the language-model cross-entropy alone;
- ``loss/aux_balance``, ``loss/z``: the weighted load-balancing and router
  z-loss terms (what they add to the loss), ``loss/aux_total`` their sum;
- ``lr``, ``grad_norm`` (global: torchtitan reduces it over every mesh, the
  EP and non-EP parameters together), ``throughput(tps)`` (tokens/s per
  device), ``throughput/global_tokens_per_s``, ``tflops``, ``mfu(%)``
  (from ``flops_per_token`` at ``[training].seq_len``);
- per MoE layer L and expert set S, ``moe/layerL.setS/...``:
  ``load_imbalance`` (max / mean expert load over the global batch),
  ``dropped_fraction`` (token-slots dropped by capacity routing),
  ``aux_loss``/``z_loss`` (unweighted), and with loss-free balancing on,
  ``bias_range`` (max - min expert bias).

All per-rank quantities are weighted by the rank's share of the global valid
tokens, then summed over the data-parallel world: the same token-weighted
mean the loss uses, so no metric depends on the DP degree.
"""

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import BaseLogger, LoggerContainer, MetricsProcessor
from torchtitan.tools.logging import logger

_SET_NAME = re.compile(r"layers\.(\d+)\..*sets\.(\d+)$")


def set_tag(module_name: str) -> str:
    """``layers.3._checkpoint_wrapped_module.moe.sets.1`` -> ``layer3.set1``."""
    match = _SET_NAME.search(module_name)
    return f"layer{match.group(1)}.set{match.group(2)}" if match else module_name


class MoEStepStats:
    """Token-weighted sums of one optimizer step's MoE numbers, over its microbatches."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.sums = {}

    def add(self, name: str, value: torch.Tensor, share: torch.Tensor) -> None:
        """Add ``value * share``; ``share`` = this microbatch's local tokens / global tokens."""
        weighted = value.detach().float() * share
        self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted

    def add_microbatch(
        self,
        lm_loss: torch.Tensor,
        moe_stats: dict[str, dict[str, torch.Tensor]],
        share: torch.Tensor,
        aux_loss_weight: float,
        z_loss_weight: float,
    ) -> None:
        """Record a microbatch: ``lm_loss`` already divided by the global tokens."""
        self.sums["loss/lm"] = self.sums.get("loss/lm", 0) + lm_loss.detach().float()
        if not moe_stats:
            return
        layers: dict[str, list[dict[str, torch.Tensor]]] = {}
        for name, stats in moe_stats.items():
            tag = set_tag(name)
            layers.setdefault(tag.split(".")[0], []).append(stats)
            self.add(f"moe/{tag}/aux_loss", stats["aux_loss"], share)
            self.add(f"moe/{tag}/z_loss", stats["z_loss"], share)
            self.add(f"moe/{tag}/dropped_fraction", stats["dropped_fraction"], share)
        # The model's aux loss: per layer the sum over its sets, then the mean over layers.
        n_layers = len(layers)
        aux = sum(s["aux_loss"].detach() for sets in layers.values() for s in sets) / n_layers
        z = sum(s["z_loss"].detach() for sets in layers.values() for s in sets) / n_layers
        self.add("loss/aux_balance", aux_loss_weight * aux, share)
        self.add("loss/z", z_loss_weight * z, share)

    def reduce(self, group: dist.ProcessGroup | None,
               global_values: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Sum every entry over ``group`` and read it to the host together with ``global_values``.

        One all-reduce and one ``.tolist()`` per log step for all MoE metrics
        (call on every rank): ``global_values`` are device scalars that are
        already the same on every rank (e.g. from the reduced expert loads) and
        ride along in the same host transfer.
        """
        global_values = global_values or {}
        if not self.sums and not global_values:
            return {}
        names = list(self.sums)
        tensors = [v for v in [*self.sums.values(), *global_values.values()] if isinstance(v, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        values: dict[str, float] = {}
        if names:
            flat = torch.stack([torch.as_tensor(self.sums[n], device=device).float().reshape(()) for n in names])
            if group is not None:
                dist.all_reduce(flat, group=group)
        else:
            flat = torch.zeros(0, device=device)
        extra = list(global_values)
        if extra:
            flat = torch.cat([flat, torch.stack([global_values[n].to(device).float().reshape(()) for n in extra])])
        values = dict(zip(names + extra, flat.tolist()))  # the one host sync
        if "loss/aux_balance" in values:
            values["loss/aux_total"] = values["loss/aux_balance"] + values["loss/z"]
        return values


def load_metrics(global_load: dict[str, torch.Tensor], biases: dict[str, torch.Tensor],
                 bias_on: bool) -> dict[str, torch.Tensor]:
    """Per-set load imbalance from the globally reduced loads, and the bias range, as device
    scalars (no host sync here: ``MoEStepStats.reduce`` reads them with everything else)."""
    out: dict[str, torch.Tensor] = {}
    for name, load in global_load.items():
        load = load.float()
        mean = load.mean()
        out[f"moe/{set_tag(name)}/load_imbalance"] = torch.where(
            mean > 0, load.max() / mean.clamp_min(torch.finfo(torch.float32).tiny), torch.nan)
    if bias_on:
        for name, bias in biases.items():
            out[f"moe/{set_tag(name)}/bias_range"] = (bias.max() - bias.min()).detach()
    return out


def _record_step(line: str) -> int | None:
    """The step of one JSONL record; None for a line torn by a kill mid-write (it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class JsonlLogger(BaseLogger):
    """Appends ``{"step": N, metric: value, ...}`` per log step; tests and benchmarks read it."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def resume_at(self, step: int) -> None:
        """Drop records after ``step`` (logged by a run that died before its next checkpoint)."""
        self.file.close()
        with open(self.path, encoding="utf-8", errors="replace") as f:
            kept = [line for line in f if _record_step(line) is not None and _record_step(line) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, "time": time.time()} | {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ResumableTensorBoardLogger(BaseLogger):
    """TensorBoard at a fixed ``{dump_folder}/{save_tb_folder}``, for every restart of a run.

    torchtitan opens a new timestamped directory per start, so a resumed run
    shows up as a second run with the steps after the checkpoint drawn twice.
    Here all restarts write into one directory, and ``resume_at(step)`` writes
    TensorBoard's purge marker: points after ``step`` from earlier files are
    discarded by TensorBoard, so each step has one point.
    """

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, max_queue=1000)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def resume_at(self, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _loggers(logger_obj: BaseLogger) -> list[BaseLogger]:
    """The concrete loggers inside (nested) containers."""
    if isinstance(logger_obj, LoggerContainer):
        return [leaf for inner in logger_obj._loggers for leaf in _loggers(inner)]
    return [logger_obj]


class TitanMetricsProcessor(MetricsProcessor):
    """torchtitan's MetricsProcessor plus the MoE metrics, a JSONL copy, a settable peak,
    and TensorBoard/JSONL logs that resume at the restored step without duplicate points."""

    def __init__(self, job_config: Any, parallel_dims: Any, tag: str | None = None):
        metrics = job_config.metrics
        tensorboard, metrics.enable_tensorboard = metrics.enable_tensorboard, False  # built below, at a stable path
        try:
            super().__init__(job_config, parallel_dims, tag)
        finally:
            metrics.enable_tensorboard = tensorboard
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if tensorboard and rank0:
            container = LoggerContainer()
            for existing in _loggers(self.logger):
                if type(existing) is not BaseLogger:
                    container.add_logger(existing)
            container.add_logger(ResumableTensorBoardLogger(os.path.join(job_config.job.dump_folder, metrics.save_tb_folder)))
            self.logger = container
        if job_config.metrics.peak_tflops > 0:
            self.gpu_peak_flops = job_config.metrics.peak_tflops * 1e12
        # Set by the trainer: returns extra metrics for this log step (may run collectives).
        self.extra_metrics_fn: Callable[[], dict[str, float]] | None = None
        self.dp_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard
        if job_config.metrics.jsonl and (not dist.is_initialized() or dist.get_rank() == 0):
            container = LoggerContainer()
            container.add_logger(self.logger)
            container.add_logger(JsonlLogger(os.path.join(job_config.job.dump_folder, "metrics.jsonl")))
            self.logger = container

    def resume_at(self, step: int) -> None:
        """The run continues after checkpoint ``step``: forget what was logged past it."""
        for each in _loggers(self.logger):
            if hasattr(each, "resume_at"):
                each.resume_at(step)

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None) -> None:
        elapsed = time.perf_counter() - self.time_last_log
        extra = dict(extra_metrics or {})
        extra["throughput/global_tokens_per_s"] = self.ntokens_since_last_log * self.dp_degree / max(elapsed, 1e-9)
        moe = self.extra_metrics_fn() if self.extra_metrics_fn is not None else {}
        extra.update(moe)
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        if "loss/aux_total" in moe:
            imbalance = [v for k, v in moe.items() if k.endswith("/load_imbalance")]
            dropped = [v for k, v in moe.items() if k.endswith("/dropped_fraction")]
            logger.info(
                f"step: {step:2}  lm: {moe['loss/lm']:8.5f}  aux: {moe['loss/aux_balance']:.5f}  "
                f"z: {moe['loss/z']:.6f}  load max/mean: {max(imbalance, default=float('nan')):.3f}  "
                f"dropped: {max(dropped, default=0.0):.4f}"
            )

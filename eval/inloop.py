"""Eval from inside the training loop: a chosen suite every N steps.

Training reaches this module only through ``[eval].validator`` (default
``eval.inloop:build_inloop_validator``), an import path the trainer resolves at
run time: ``build_inloop_validator`` returns a torchtitan validator that runs
in torchtitan's loop beside ``[validation]``, so titan_moe never imports eval.
The scoring itself is one call:

    from eval.inloop import maybe_evaluate
    scalars = maybe_evaluate(job_config.eval, step, model_parts[0], seq_len=job_config.training.seq_len)
    if scalars: metric_logger.log(scalars, step)   # {"eval/paloma/macro_ce": ..., ...}

Every rank must call it at the same steps (the model may be FSDP- or
expert-parallel-sharded; scoring runs in lock-step and gathers results).
The model is put in eval mode and restored, and MoE load counters are left
untouched, so the bias update after the next step sees only training tokens.

The `[eval]` section itself (`EvalSettings`) belongs to the run config, so it
lives in `titan_moe.run_config.job_config`.
"""

import functools
from typing import Any

from torchtitan.components.validate import BaseValidator

from eval.models import ModuleLogitsModel
from eval.report import scalars
from eval.suite import run_suite
from eval.tokenizer import TextTokenizer
from titan_moe.run_config.job_config import EvalSettings

__all__ = ["InLoopEvalValidator", "build_inloop_validator", "maybe_evaluate"]


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, eos_id: int) -> TextTokenizer:
    return TextTokenizer.load(name, eos_id=None if eos_id < 0 else eos_id)


def maybe_evaluate(cfg: EvalSettings, step: int, model, *, seq_len: int, group=None, name: str = "train") -> dict | None:
    """Flat `eval/...` scalars when `step` is an eval step, else None (call on every rank)."""
    if not cfg.enabled() or step % cfg.freq:
        return None
    tok = _tokenizer(cfg.tokenizer, cfg.eos_id)
    lm = ModuleLogitsModel(model, max_seq_len=seq_len, eos_id=tok.eos_id, name=name, step=step)
    results = run_suite(lm, tok, cfg, group=group, progress=False)
    return scalars({"tasks": results["tasks"]})


class InLoopEvalValidator(BaseValidator):
    """The `[eval]` suite as a torchtitan validator: scalars go to the run's metric loggers."""

    def __init__(self, job_config: Any, metrics_processor: Any):
        super().__init__(job_config)
        self.cfg: EvalSettings = job_config.eval
        self.metrics_processor = metrics_processor

    def should_validate(self, step: int) -> bool:
        return self.cfg.enabled() and step % self.cfg.freq == 0

    def validate(self, model_parts: list, step: int) -> None:
        job = self.job_config
        found = maybe_evaluate(self.cfg, step, model_parts[0], seq_len=job.training.seq_len, name=job.job.description)
        if found:
            self.metrics_processor.logger.log(found, step)


def build_inloop_validator(*, job_config: Any, metrics_processor: Any, **_: Any) -> InLoopEvalValidator:
    """The factory `[eval].validator` names by default."""
    return InLoopEvalValidator(job_config, metrics_processor)

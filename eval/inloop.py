"""Eval from inside the training loop: a chosen suite every N steps.

The trainer owns the schedule hook; this module gives it one call:

    from eval.inloop import InLoopEval, maybe_evaluate
    scalars = maybe_evaluate(job_config.eval, step, model_parts[0], seq_len=job_config.training.seq_len)
    if scalars: metric_logger.log(scalars, step)   # {"eval/paloma/macro_ce": ..., ...}

Every rank must call it at the same steps (the model may be FSDP- or
expert-parallel-sharded; scoring runs in lock-step and gathers results).
The model is put in eval mode and restored, and MoE load counters are left
untouched, so the bias update after the next step sees only training tokens.

`InLoopEval` is written without `from __future__ import annotations` so it
can be merged into torchtitan's JobConfig as an `[eval]` section as is.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

from eval.models import ModuleLogitsModel
from eval.report import scalars
from eval.suite import SuiteConfig, run_suite
from eval.tokenizer import TextTokenizer


@dataclass
class InLoopEval:
    """The `[eval]` section of a run config."""

    tasks: str = ""
    """Suite to run, in `titan-moe eval --tasks` syntax, e.g. "paloma:c4_en+wikitext_103,boolq"; "" = off."""

    freq: int = 0
    """Run every `freq` training steps; 0 = off."""

    data_root: str = ""
    """Folder with the task data (as `titan-moe eval --data-root`)."""

    tokenizer: str = ""
    """tokenizer.json path or hub id used to encode prompts and documents."""

    eos_id: int = -1
    """End-of-text id; -1 = the tokenizer's."""

    limit: int = 0
    """First N questions / documents per subset (0 = all): keep in-loop evals short."""

    shots: str = "0"
    """Downstream few-shot settings, e.g. "0" or "0,5"."""

    batch_tokens: int = 16384
    """Tokens per forward pass (rows x padded length)."""

    def enabled(self) -> bool:
        return bool(self.tasks) and self.freq > 0


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, eos_id: int) -> TextTokenizer:
    return TextTokenizer.load(name, eos_id=None if eos_id < 0 else eos_id)


def maybe_evaluate(cfg: InLoopEval, step: int, model, *, seq_len: int, group=None, name: str = "train") -> dict | None:
    """Flat `eval/...` scalars when `step` is an eval step, else None (call on every rank)."""
    if not cfg.enabled() or step % cfg.freq:
        return None
    tok = _tokenizer(cfg.tokenizer, cfg.eos_id)
    lm = ModuleLogitsModel(model, max_seq_len=seq_len, eos_id=tok.eos_id, name=name, step=step)
    suite = SuiteConfig(
        data_root=Path(cfg.data_root) if cfg.data_root else None,
        shots=tuple(int(s) for s in cfg.shots.split(",") if s.strip()),
        limit=cfg.limit or None,
        batch_tokens=cfg.batch_tokens,
        progress=False,
    )
    results = run_suite(lm, tok, cfg.tasks, config=suite, group=group)
    return scalars({"tasks": results["tasks"]})

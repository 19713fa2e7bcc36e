"""ai2-olmo-eval tasks: `titan-moe eval` gives what the library's own metric computes on the same model."""

from __future__ import annotations

import json

import pytest
import torch

from tests.eval_support import EOS, TOKENIZER_JSON, make_tiny_model, require_shared_data

pytest.importorskip("olmo_eval", reason="ai2-olmo-eval is in the dev group; install it to test its tasks")

TASKS = ("hellaswag_rc_5shot", "boolq_mc_5shot", "arc_easy_rc_5shot", "mmlu_stem_test")
LIMIT = 10
CTX = 256


@torch.no_grad()
def _library_metrics(model_dir, label: str) -> dict[str, float]:
    """What OLMo-core's DownstreamEvaluator does: the library's dataset, collate_fn, ICLMetric on full logits."""
    import transformers
    from olmo_eval import HFTokenizer, ICLMetric, build_task

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = HFTokenizer(str(TOKENIZER_JSON), pad_token_id=1, eos_token_id=EOS)
    task = build_task(label, tok, model_ctx_len=CTX)
    first_docs = sorted({s["doc_id"] for s in task.samples})[:LIMIT]
    samples = [s for s in task.samples if s["doc_id"] in first_docs]
    metric = ICLMetric(metric_type=task.metric_type)
    for i in range(0, len(samples), 8):
        batch = task.collate_fn(samples[i : i + 8])
        metric.update(batch, model(batch["input_ids"]).logits)
    return {k: float(v) for k, v in metric.compute().items()}


@pytest.mark.slow
def test_cli_equals_the_library_metric_on_the_same_model(tmp_path):
    from eval.cli import main

    require_shared_data()
    model_dir = make_tiny_model(tmp_path, max_seq_len=CTX)
    out = tmp_path / "results.json"
    rc = main(["--hf-model", str(model_dir), "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
               "--batch-tokens", "2048", "--out", str(out), "--no-progress", "--tb-dir", str(tmp_path / "tb")])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    for label in TASKS:
        entry = doc["tasks"][label]
        want = _library_metrics(model_dir, label)
        assert entry["n"] == LIMIT and entry["library"].startswith("ai2-olmo-eval ")
        assert set(entry["metrics"]) == set(want)
        for key, value in want.items():
            # Accuracies are counts over 10 questions: exactly equal.  Losses differ only by the
            # float32 rounding of differently shaped batches (titan-moe packs by length, no 128-padding).
            assert entry["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (label, key)
        assert entry["metric_type"] in ("acc", "len_norm")
        acc = entry["metrics"][f"{entry['metric_type']}_v1"]
        assert acc * LIMIT == pytest.approx(round(acc * LIMIT))
    # TensorBoard under OLMo-core's own tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (point,) = events.Scalars("eval/downstream/hellaswag_rc_5shot (length-normalized accuracy)")
    assert point.value == pytest.approx(doc["tasks"]["hellaswag_rc_5shot"]["metrics"]["len_norm_v1"])
    (point,) = events.Scalars("eval/downstream/boolq_mc_5shot (BPB)")
    assert point.value == pytest.approx(doc["tasks"]["boolq_mc_5shot"]["metrics"]["bpb_v1"])


def test_unknown_task_fails_naming_it(capsys):
    from eval.cli import main

    assert main(["--hf-model", "x", "--tasks", "paloma,hellaswag_rc_5shot,hellaswag_rc_6shot"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'hellaswag_rc_6shot'; available: paloma, any ai2-olmo-eval task" in err


def test_task_with_zero_scored_examples_fails_naming_it(tmp_path, capsys):
    """A 4-token context cannot hold any of the first three MMLU-STEM questions' longest answers
    (10, 5 and 16 tokens): nothing is scored, the command fails.  (HellaSwag would show the same
    but takes ~30 s to build its requests; MMLU-STEM ~5 s.)"""
    from eval.cli import main

    require_shared_data()
    model_dir = make_tiny_model(tmp_path, max_seq_len=CTX)
    out = tmp_path / "results.json"
    rc = main(["--hf-model", str(model_dir), "--tasks", "arc_easy_rc_5shot,mmlu_stem_test", "--limit", "3",
               "--max-seq-len", "4", "--out", str(out), "--no-progress", "--no-tensorboard"])  # fmt: skip
    assert rc == 1
    assert "titan-moe eval: zero scored examples in mmlu_stem_test" in capsys.readouterr().err
    doc = json.loads(out.read_text())  # the evidence is still written
    assert doc["tasks"]["mmlu_stem_test"]["n"] == 0 and doc["tasks"]["mmlu_stem_test"]["skipped"] == 3
    assert doc["tasks"]["arc_easy_rc_5shot"]["n"] > 0

"""The trainer runs the run config's [eval] suite every N steps on the live, sharded model."""

import pytest

from tests.distributed_utils import config, read_metrics, run_trainer_jobs
from tests.eval_support import TOKENIZER_JSON

pytestmark = pytest.mark.slow


def test_inloop_eval_logs_task_metrics_at_its_steps(tmp_path):
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"the OLMoE tokenizer copy is not at {TOKENIZER_JSON}")
    job = ["--job.config_file", config("tiny_moe"), "--training.steps", "4", "--arch.vocab_size", "50280",
           "--parallelism.expert_parallel_degree", "2", "--metrics.no-enable-tensorboard",
           "--eval.tasks", "arc_easy_rc_5shot,mmlu_stem_test", "--eval.freq", "2", "--eval.limit", "4",
           "--eval.tokenizer", str(TOKENIZER_JSON)]
    folders = run_trainer_jobs({"inloop": job}, nproc=2, workdir=tmp_path)
    metrics = read_metrics(folders["inloop"])
    evaluated = {r["step"]: r for r in metrics if "eval/downstream/mmlu_stem_test (length-normalized accuracy)" in r}
    assert sorted(evaluated) == [2, 4]
    for record in evaluated.values():
        # OLMo-core's in-loop tasks, under OLMo-core's own tags: 4 questions each.
        assert record["eval/downstream/mmlu_stem_test (length-normalized accuracy)"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert record["eval/downstream/mmlu_stem_test (CE loss)"] > 0
        assert record["eval/downstream/arc_easy_rc_5shot (accuracy)"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert record["eval/downstream/arc_easy_rc_5shot (BPB)"] > 0

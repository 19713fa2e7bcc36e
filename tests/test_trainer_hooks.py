"""The trainer is torchtitan's loop plus hooks: [profiling] works, and training never imports eval."""

import ast
import json
from pathlib import Path

import pytest

from tests.distributed_utils import REPO, config, run_trainer_jobs


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_titan_moe_never_imports_eval():
    """Data flows data_prep -> titan_moe -> eval: no titan_moe module imports eval, not even lazily."""
    offenders = {
        str(path.relative_to(REPO)): name
        for path in sorted((REPO / "titan_moe").rglob("*.py"))
        for name in _imported_modules(path)
        if name == "eval" or name.startswith("eval.")
    }
    assert offenders == {}


def test_the_static_check_sees_lazy_imports(tmp_path):
    """The check above would catch an import inside a function (the old in-loop eval hook)."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from eval.inloop import maybe_evaluate\n    import eval.suite\n")
    assert _imported_modules(sample) == ["eval.inloop", "eval.suite"]


def test_eval_validator_factory_is_resolved_by_import_path():
    from titan_moe.common.errors import ConfigError
    from titan_moe.run_config.job_config import EvalSettings
    from titan_moe.trainer.train_spec import import_factory

    factory = import_factory(EvalSettings().validator, "eval.validator")
    assert factory.__module__ == "eval.inloop" and factory.__name__ == "build_inloop_validator"
    with pytest.raises(ConfigError, match=r"eval\.validator.*'package\.module:function'"):
        import_factory("eval.inloop", "eval.validator")
    with pytest.raises(ConfigError, match=r"eval\.validator.*cannot load 'eval.inloop:nope'"):
        import_factory("eval.inloop:nope", "eval.validator")


@pytest.mark.slow
def test_profiling_writes_a_trace_per_rank_and_cycle(tmp_path):
    job = ["--job.config_file", config("tiny_moe"), "--training.steps", "4", "--metrics.no-enable-tensorboard",
           "--parallelism.expert_parallel_degree", "2", "--profiling.enable_profiling",
           "--profiling.profile_freq", "2", "--profiling.profiler_warmup", "0", "--profiling.profiler_active", "1"]
    folders = run_trainer_jobs({"profiled": job}, nproc=2, workdir=tmp_path)
    traces = sorted(p.relative_to(folders["profiled"]) for p in folders["profiled"].rglob("*_trace.json"))
    assert [str(p) for p in traces] == [f"profile_traces/iteration_{i}/rank{r}_trace.json" for i in (2, 4) for r in (0, 1)]
    events = json.loads((folders["profiled"] / traces[0]).read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events), "the trace holds the step's operators"

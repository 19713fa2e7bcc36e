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
from titan_moe.run_config.job_config import load_run_config

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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_refuses_a_config_that_does_not_describe_the_checkpoint(tmp_path, capsys):
    """4 experts on an 8-expert checkpoint, MoE on dense, other GQA: refused before anything is written."""
    point, _ = _point(tmp_path / "p", "true", DESIGNS["moe_renormalized"][1])  # 8 experts, top-3
    before = _tree(tmp_path)
    wrong = {
        "experts": ARCH.format(dump=point, assets=point / "assets", qk_norm="true")
        + MOE.format(sets='{ num_experts = 4, granularity = "1/4", top_k = 2 }', gen="0", routing="dropless",
                     renorm="true"),
        "dense": ARCH.format(dump=point, assets=point / "assets", qk_norm="true"),
        "gqa": ARCH.format(dump=point, assets=point / "assets", qk_norm="true").replace("n_kv_heads = 2", "n_kv_heads = 4")
        + MOE.format(**DESIGNS["moe_renormalized"][1]),
    }
    expected = {
        "experts": "layers.0.moe.sets.0.experts.w1: checkpoint (8, 16, 32) vs config (4, 16, 32)",
        "dense": "missing layers.0.feed_forward.w1.weight",
        "gqa": "layers.0.attention.wk.weight: checkpoint (16, 32) vs config (32, 32)",
    }
    for name, text in wrong.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(text)
        out = tmp_path / f"hf-{name}"
        code = checkpoints_main(["export", str(point / "checkpoint"), "--format", "hf", "--config", str(config),
                                 "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "--config: the run config does not describe the model saved in" in err and expected[name] in err, err
        assert "pass the run config the checkpoint was trained with" in err
        assert not out.exists() and not list(tmp_path.glob(".hf-*"))
        config.unlink()
    assert _tree(tmp_path) == before  # nothing written or changed anywhere


def test_export_accepts_a_step_folder_and_never_overwrites_silently(tmp_path, capsys):
    point, model = _point(tmp_path / "p", "true", DESIGNS["moe"][1])
    step_dir = point / "checkpoint" / "step-5"

    # A complete step-N folder is a checkpoint (as for eval); its config is found next to the checkpoint folder.
    hf = tmp_path / "hf"
    assert checkpoints_main(["export", str(step_dir), "--format", "hf", "--out", str(hf)]) == 0
    assert json.loads((hf / "titan_moe_export.json").read_text())["step"] == 5
    pt = tmp_path / "model.pt"
    assert checkpoints_main(["export", str(step_dir), "--out", str(pt)]) == 0
    saved = torch.load(pt, weights_only=True)
    assert saved["step"] == 5 and torch.equal(saved["model"]["output.weight"], model.output.weight)
    capsys.readouterr()

    def refused(argv: list[str], message: str) -> None:
        before = _tree(tmp_path)
        assert checkpoints_main(["export", str(step_dir), *argv]) == 2
        assert message in capsys.readouterr().err
        assert _tree(tmp_path) == before and not list(tmp_path.glob(".*tmp*"))

    refused(["--out", str(pt)], f"--out: {pt} exists; choose a new file or pass --force to overwrite it")
    refused(["--out", str(hf)], f"--out: {hf} is a folder; --format pt writes one file")
    refused(["--out", str(pt / "x.pt")], f"--out: {pt} is a file, not a folder")
    refused(["--format", "hf", "--out", str(pt)], f"--out: {pt} is a file; --format hf writes a folder")
    refused(["--format", "hf", "--out", str(hf)], f"--out: {hf} exists and is not empty; choose a new folder or "
                                                  "pass --force to replace it")
    refused(["--format", "hf", "--out", str(tmp_path / "new"), "--step", "7"], "--step: ")
    (point / "checkpoint" / "step-5" / "COMMITTED").rename(point / "checkpoint" / "step-5" / "C")
    refused(["--out", str(tmp_path / "new.pt")], "cannot be loaded: no COMMITTED marker")
    (point / "checkpoint" / "step-5" / "C").rename(point / "checkpoint" / "step-5" / "COMMITTED")

    # --force replaces, whole.
    (hf / "stale.txt").write_text("from an older export")
    assert checkpoints_main(["export", str(step_dir), "--format", "hf", "--out", str(hf), "--force"]) == 0
    assert not (hf / "stale.txt").exists() and (hf / "model.safetensors").is_file()
    pt.write_bytes(b"old")
    assert checkpoints_main(["export", str(step_dir), "--out", str(pt), "--force"]) == 0
    assert torch.load(pt, weights_only=True)["step"] == 5


def test_exported_folder_generates_as_users_call_it(tmp_path):
    """`generate(**tok(text, return_tensors="pt"))` and pipeline("text-generation") on the folder as saved."""
    point, model = _point(tmp_path / "p", "true", DESIGNS["moe"][1])
    hf_dir = tmp_path / "hf"
    assert checkpoints_main(["export", str(point / "checkpoint"), "--format", "hf", "--out", str(hf_dir)]) == 0
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == 50279
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    inputs = tok("Rivers carry sediment", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    out = hf.generate(**inputs, max_new_tokens=5, do_sample=False)
    # Greedy continuation: titan-moe's own model picks the same tokens.
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    stop = out.shape[1]  # generate stops early only at eos
    assert out[0].tolist() == ids[0, :stop].tolist() and stop > inputs["input_ids"].shape[1]
    pipe = transformers.pipeline("text-generation", model=str(hf_dir))
    text = pipe("Rivers carry sediment", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(out[0], skip_special_tokens=True)

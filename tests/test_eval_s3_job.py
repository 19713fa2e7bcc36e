"""The eval Job of a run whose data lives on object storage, end to end on the loopback S3 server.

prep writes to s3:// (its tokenizer.json next to the manifest), the trainer
trains a few steps from there (1 process) and keeps a copy of the tokenizer
beside its checkpoints, then the eval Job's rendered command runs unchanged
but for the ConfigMap's mount path: it finds the tokenizer from the run
config alone, in the checkpoint folder or, once that copy is gone, on S3.
Render refuses a run whose eval Job could not find a tokenizer.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep
from jobs.k8s import render_run
from jobs.k8s.manifests import CONFIG_KEY, CONFIG_MOUNT
from tests.distributed_utils import REPO
from tests.k8s_support import IMAGE
from tests.prep_support import TOKENIZER, make_corpus
from titan_moe.common.errors import ConfigError

RUN = """
[job]
description = "tiny MoE on prepped data in a bucket"
[model]
name = "titan_moe"
hf_assets_path = "."  # as the shipped configs: no tokenizer there
[arch]
dim = 32
n_layers = 2
n_heads = 4
ffn_hidden = 64
vocab_size = 50280
qk_norm = true
[moe]
enabled = true
expert_sets = [ {{ num_experts = 4, granularity = "1/2", top_k = 2 }} ]
[training]
seq_len = 64
local_batch_size = 2
steps = 2
mixed_precision_param = "float32"
[optimizer]
implementation = "foreach"
[data]
root = "{root}"
local_cache = "{cache}"
[checkpoint]
enable = true
interval = 2
folder = "checkpoint"
[metrics]
log_freq = 1
"""


def _paloma(root: Path) -> None:
    folder = root / "paloma" / "c4_en" / "val"
    folder.mkdir(parents=True)
    with gzip.open(folder / "val.jsonl.gz", "wt") as f:
        for i, k in enumerate((1, 3, 7)):
            f.write(json.dumps({"text": "Rivers carry sediment to the sea and build deltas. " * k, "id": str(i)}) + "\n")


def _eval_argv(out: Path, config: Path) -> list[str]:
    """The eval Job container's command, with the ConfigMap mount replaced by the local file."""
    job = yaml.safe_load((out / "eval-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = [*container["command"], *container.get("args", [])]
    assert command[:2] == ["titan-moe", "eval"]
    mount = f"{CONFIG_MOUNT}/{CONFIG_KEY}"
    return [str(config) if word == mount else word for word in command[2:]]


@pytest.mark.slow
def test_eval_job_scores_a_run_whose_data_is_on_s3(s3, s3_bucket, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", seed=3, docs_per_file=10)
    root = f"s3://{s3_bucket}/mix"
    run_prep(PrepConfig(input_root=str(corpus.root), output=root, tokenizer=str(TOKENIZER), seq_len=64, workers=1,
                        shard_size="64kb", progress=False))
    assert s3.get(s3_bucket, "mix/tokenizer.json") == TOKENIZER.read_bytes()  # next to the manifest

    runs = tmp_path / "runs"
    config = tmp_path / "s3run.toml"
    config.write_text(RUN.format(root=root, cache=tmp_path / "cache"))
    out = tmp_path / "k8s"
    render_run(config, 1, 1, IMAGE, out, runs_mount=str(runs), eval_gpus=0, eval_tasks="paloma:c4_en")
    configmap = yaml.safe_load((out / "configmap.yaml").read_text())
    shipped = tmp_path / "config" / CONFIG_KEY  # what the pods read at /config/run.toml
    shipped.parent.mkdir()
    shipped.write_text(configmap["data"][CONFIG_KEY])
    argv = _eval_argv(out, shipped)
    run_dir = Path(argv[argv.index("--checkpoint") + 1]).parent

    # Train as the JobSet's trainer does: the shipped config, dump folder on the run volume.
    train = subprocess.run([sys.executable, "-m", "titan_moe.cli", "train", str(shipped), "--nproc", "1",
                            "--job.dump_folder", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    copy = run_dir / "checkpoint" / "tokenizer.json"
    assert copy.read_bytes() == TOKENIZER.read_bytes()  # the checkpoint keeps its tokenizer

    _paloma(Path(argv[argv.index("--data-root") + 1]))
    results = Path(argv[argv.index("--out") + 1])
    proc = subprocess.run([sys.executable, "-m", "titan_moe.cli", "eval", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads(results.read_text())
    assert first["source"]["tokenizer"] == str(copy) and first["step"] == 2
    assert first["tasks"]["paloma"]["subsets"]["c4_en"]["tokens"] > 30

    # Without the copy (a checkpoint from before it was kept): the tokenizer comes from [data].root on S3.
    copy.unlink()
    from eval.cli import main as eval_main

    assert eval_main(argv) == 0
    second = json.loads(results.read_text())
    assert second["source"]["tokenizer"] == f"{root}/tokenizer.json"
    assert second["tasks"]["paloma"]["macro_ce"] == first["tasks"]["paloma"]["macro_ce"]


def test_render_refuses_a_run_whose_eval_job_has_no_tokenizer(tmp_path):
    config = tmp_path / "synthetic.toml"
    config.write_text(RUN.format(root="", cache=tmp_path / "c").replace('root = ""', "")
                      .replace("[training]", '[training]\ndataset = "synthetic"'))
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        render_run(config, 1, 1, IMAGE, out)
    assert err.value.field == "model.hf_assets_path"
    message = str(err.value)
    assert "could not find a tokenizer (training.dataset = 'synthetic' has no tokenizer, and hf_assets_path = '.'" in message
    assert "Train on data written by `titan-moe prep`" in message and "absolute folder or URL" in message
    assert not out.exists()

    foundry = tmp_path / "foundry.toml"
    foundry.write_text(RUN.format(root="s3://bucket/foundry", cache=tmp_path / "c")
                       .replace("[data]", '[data]\nformat = "llm-foundry"'))
    with pytest.raises(ConfigError, match=r"\[data\].format = 'llm-foundry' folders carry no tokenizer.json"):
        render_run(foundry, 1, 1, IMAGE, out)
    # Naming where the tokenizer is fixes it.
    foundry.write_text(foundry.read_text().replace('hf_assets_path = "."', 'hf_assets_path = "s3://bucket/tok"'))
    assert render_run(foundry, 1, 1, IMAGE, out)
    with pytest.raises(ConfigError, match="--eval-tasks: "):
        render_run(foundry, 1, 1, IMAGE, tmp_path / "o2", eval_tasks="palomma")

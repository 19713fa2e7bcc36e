"""The streaming loader on real MDS streams, one process: batches, shares, state, bad input."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from tests.mds_streams import EOS, PAD, SOURCE_BASE, decode_ids, sample_tokens, write_prep_output
from titan_moe.data.config import DataConfig
from titan_moe.data.loader import build_streaming_dataloader
from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import parse_run_config

SEQ = 32


@pytest.fixture(scope="module")
def base_job(tmp_path_factory):
    """One parsed run config (parsing costs ~0.3 s); tests copy it and set [data]."""
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(f'[training]\nseq_len = {SEQ}\nlocal_batch_size = 4\n[data]\nroot = "unset"\n')
    return parse_run_config(["--job.config_file", str(path)])


def job(base, tmp_path, root, batch: int = 4, seq_len: int = SEQ, **data):
    out = copy.deepcopy(base)
    out.data = DataConfig(root=str(root), local_cache=str(tmp_path / "cache"), **data)
    out.training.local_batch_size = batch
    out.training.seq_len = seq_len
    out.job.dump_folder = str(tmp_path)
    return out


def read(loader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = [(inputs["input"], labels) for _, (inputs, labels) in zip(range(steps), loader)]
    return out


def test_batches_follow_the_label_convention(base_job, tmp_path):
    # Source b's last sequence holds 7 real tokens, then padding.
    root = write_prep_output(tmp_path / "mix", {"a": 9, "b": 3}, seq_len=SEQ, last_valid={"b": 7})
    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root))
    batches = read(loader, 3)  # one epoch of 12 sequences
    loader.close()
    seen = []
    for inputs, labels in batches:
        assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (4, SEQ)
        for row, (source, sample) in enumerate(decode_ids(inputs)):
            seen.append((source, sample))
            valid = 7 if (source, sample) == (1, 2) else SEQ
            expected = sample_tokens(source, sample, SEQ)
            expected[valid:] = PAD
            assert inputs[row].tolist() == expected.tolist()  # uint16 widened by value: 65535, 50279 intact
            want = np.full(SEQ, -100)
            want[: valid - 1] = expected[1:valid]
            assert labels[row].tolist() == want.tolist()
    assert sorted(seen) == [(0, i) for i in range(9)] + [(1, i) for i in range(3)]
    assert (torch.cat([b[0] for b in batches]) == 65535).any() and (torch.cat([b[0] for b in batches]) == EOS).any()


def test_uint32_streams_widen_by_value(base_job, tmp_path):
    root = write_prep_output(tmp_path / "mix", {"a": 4}, seq_len=SEQ, dtype="uint32")
    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root))
    (inputs, _), = read(loader, 1)
    loader.close()
    assert sorted(decode_ids(inputs)) == [(0, i) for i in range(4)]
    assert inputs.max() == 65535


def test_token_shares_meet_the_configured_weights(base_job, tmp_path):
    """Over 2400 samples the per-source token share is within 0.5 % of its weight.

    Bound: every mixture window boundary is within 1 + #sources/2 samples of
    the exact shares; the tolerance covers that plus one partial window of 64.
    """
    root = write_prep_output(tmp_path / "mix", {"a": 500, "b": 300, "c": 60}, seq_len=SEQ)
    weights = {"a": 0.25, "b": 0.35, "c": 0.4}  # c (60 sequences) upsampled ~16x
    config = job(base_job, tmp_path, root, batch=8, mixture=weights, mixture_window=64)
    loader = build_streaming_dataloader(1, 0, None, config)
    tokens = {0: 0, 1: 0, 2: 0}
    for inputs, labels in read(loader, 300):
        real = (labels != -100).sum(dim=1) + 1  # num_valid: labels cover num_valid - 1 tokens
        for (source, _), n in zip(decode_ids(inputs), real.tolist()):
            tokens[source] += n
    loader.close()
    total = sum(tokens.values())
    for source, name in enumerate(sorted(weights)):
        assert abs(tokens[source] / total - weights[name]) < 0.005, (name, tokens)


def test_natural_mixture_matches_the_manifest_proportions(base_job, tmp_path):
    root = write_prep_output(tmp_path / "mix", {"a": 30, "b": 11, "c": 3}, seq_len=SEQ, last_valid={"b": 9})
    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, batch=4))
    tokens = {0: 0, 1: 0, 2: 0}
    for inputs, labels in read(loader, 11):  # exactly one epoch of 44 sequences
        real = (labels != -100).sum(dim=1) + 1
        for (source, _), n in zip(decode_ids(inputs), real.tolist()):
            tokens[source] += n
    loader.close()
    manifest = json.loads((root / "manifest.json").read_text())
    total = sum(tokens.values())
    for source, name in enumerate(sorted(manifest["sources"])):
        assert tokens[source] / total == pytest.approx(manifest["sources"][name]["proportion"], abs=1e-12)


def test_state_round_trip_and_refusals(base_job, tmp_path):
    root = write_prep_output(tmp_path / "mix", {"a": 10, "b": 6}, seq_len=SEQ)
    config = job(base_job, tmp_path, root)
    loader = build_streaming_dataloader(1, 0, None, config)
    full = [decode_ids(i) for i, _ in read(loader, 9)]  # 36 samples: into the third epoch
    loader.close()

    loader = build_streaming_dataloader(1, 0, None, config)
    read(loader, 3)
    state = copy.deepcopy(loader.state_dict())
    loader.close()
    assert state["titan_moe_stream"]["position"] == 12

    fresh = build_streaming_dataloader(1, 0, None, config)
    fresh.load_state_dict(state)
    assert [decode_ids(i) for i, _ in read(fresh, 6)] == full[3:]
    fresh.close()

    reseeded = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, shuffle_seed=18))
    with pytest.raises(ConfigError, match=r"seed: 17 -> 18") as err:
        reseeded.load_state_dict(state)
    assert "exclude_from_loading" in str(err.value)
    # A checkpoint written by torchtitan's own text loader is refused, not half-read.
    with pytest.raises(ConfigError, match="not written by the titan-moe streaming loader"):
        reseeded.load_state_dict({"dp_rank_0": b"...", "world_size": 1})
    reseeded.close()


def test_token_budget_ends_on_a_whole_global_batch(base_job, tmp_path):
    root = write_prep_output(tmp_path / "mix", {"a": 20}, seq_len=SEQ)
    loader = build_streaming_dataloader(2, 1, None, job(base_job, tmp_path, root, batch=2, token_budget=11 * SEQ))
    batches = read(loader, 100)
    loader.close()
    assert len(batches) == 2  # 11 samples = 2 whole global batches of 4 (+3 unused)
    assert loader.state_dict()["titan_moe_stream"]["position"] == 8


def _break(root, how: str) -> str:
    """Damage a good prep output; return the config field the error must name."""
    manifest = json.loads((root / "manifest.json").read_text())
    if how == "missing_stream":
        (root / "b" / "index.json").unlink()
    elif how == "empty_manifest":
        manifest["sources"] = {}
    elif how == "stale_manifest":
        manifest["sources"]["b"]["sequences"] += 1
    elif how == "all_empty":
        for entry in manifest["sources"].values():
            entry["sequences"] = entry["tokens"] = 0
    elif how == "wrong_columns":
        shutil.rmtree(root / "b")
        write_prep_output(root.parent / "short", {"b": 5}, seq_len=16)
        shutil.move(root.parent / "short" / "b", root / "b")
    elif how == "no_manifest":
        (root / "manifest.json").unlink()
    elif how == "foreign_format":
        manifest["format"] = "something-else/2"
    (root / "manifest.json").exists() and (root / "manifest.json").write_text(json.dumps(manifest))
    return "data.root"


@pytest.mark.parametrize(
    "how, words",
    [
        ("missing_stream", "stream 'b' is listed in the manifest but"),
        ("empty_manifest", "lists no sources"),
        ("stale_manifest", "stream 'b': the manifest says 6 sequences but"),
        ("all_empty", "holds any sequence"),
        ("wrong_columns", "stream 'b' shard 0 stores column 'tokens' as 'ndarray:uint16:16'"),
        ("no_manifest", "manifest.json does not exist"),
        ("foreign_format", "format 'something-else/2'"),
    ],
)
def test_broken_prep_outputs_are_named(base_job, tmp_path, how, words):
    root = write_prep_output(tmp_path / "mix", {"a": 5, "b": 5}, seq_len=SEQ)
    field = _break(root, how)
    with pytest.raises(ConfigError) as err:
        build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root))
    assert err.value.field == field and words in str(err.value), str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing touched before the check


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"mixture": {"a": 0.5, "wiki": 0.5}}, "data.mixture.wiki", "unknown source"),
        ({"mixture": {"a": 0.5, "b": 0.6}}, "data.mixture", "sum to 1.1"),
        ({"repeat": {"wiki": 2}}, "data.repeat.wiki", "unknown source"),
        ({"seq_len": 64}, "training.seq_len", "hold sequences of 32 tokens"),
        ({"validate_hash": "sha512"}, "data.validate_hash", "not carried by every stream"),
        ({"cache_limit": "1kb"}, "data.cache_limit", "below 4 x the largest shard"),
    ],
)
def test_bad_settings_are_named(base_job, tmp_path, data, field, words):
    root = write_prep_output(tmp_path / "mix", {"a": 5, "b": 5}, seq_len=SEQ)
    seq_len = data.pop("seq_len", SEQ)
    with pytest.raises(ConfigError) as err:
        build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, seq_len=seq_len, **data))
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_mixture_may_skip_a_broken_source(base_job, tmp_path):
    # Only the streams a mixture draws from must be readable.
    root = write_prep_output(tmp_path / "mix", {"a": 5, "b": 5}, seq_len=SEQ)
    (root / "b" / "index.json").unlink()
    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, mixture={"a": 1.0, "b": 0.0}))
    (inputs, _), = read(loader, 1)
    loader.close()
    assert {s for s, _ in decode_ids(inputs)} == {0}
    assert inputs[0, 0] == SOURCE_BASE


def test_empty_sources_are_left_out_unless_asked_for(base_job, tmp_path):
    # Prep keeps a source whose every record was rejected: 0 sequences, an empty index.
    root = write_prep_output(tmp_path / "mix", {"a": 8, "b": 5}, seq_len=SEQ)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sources"]["junk"] = {**manifest["sources"]["b"], "tokens": 0, "sequences": 0, "shards": 0, "proportion": 0.0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "junk").mkdir()
    (root / "junk" / "index.json").write_text('{"shards": [], "version": 2}')
    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, repeat={"b": 2}))
    assert loader.source_names == ["a", "b"]
    loader.close()
    with pytest.raises(ConfigError) as err:
        build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, mixture={"a": 0.5, "junk": 0.5}))
    assert err.value.field == "data.mixture.junk" and "is empty" in str(err.value)


def test_a_source_added_later_only_matters_to_runs_that_read_it(base_job, tmp_path):
    root = write_prep_output(tmp_path / "v1", {"a": 12, "b": 6}, seq_len=SEQ)
    table = {"a": 0.5, "b": 0.5}
    states = {}
    for name, data in (("table", {"mixture": table}), ("natural", {})):
        loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, **data))
        read(loader, 2)
        states[name] = copy.deepcopy(loader.state_dict())
        loader.close()
    # Prep ran again with one more source; a and b are byte-identical.
    write_prep_output(tmp_path / "v2", {"a": 12, "b": 6, "c": 4}, seq_len=SEQ)
    shutil.rmtree(root)
    shutil.move(tmp_path / "v2", root)

    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root, mixture=table))
    loader.load_state_dict(states["table"])  # same streams, same order: resumes
    assert loader.position == 8
    loader.close()
    loader = build_streaming_dataloader(1, 0, None, job(base_job, tmp_path, root))
    with pytest.raises(ConfigError, match=r"the data order changed since the checkpoint \(plan: "):
        loader.load_state_dict(states["natural"])
    loader.close()


def test_preflight_check_touches_nothing(base_job, tmp_path):
    from titan_moe.data.setup import plan_data

    root = write_prep_output(tmp_path / "mix", {"a": 5, "b": 5}, seq_len=SEQ)
    config = job(base_job, tmp_path, root, repeat={"a": 3})
    assert [(s.name, s.per_epoch) for s in plan_data(config).train.plan.sources] == [("a", 15), ("b", 5)]
    config.validation.enable = True
    with pytest.raises(ConfigError) as err:
        plan_data(config)
    assert err.value.field == "data.validation_root" and "[validation].enable is true" in str(err.value)
    config.data.validation_root = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="nowhere/manifest.json does not exist"):
        plan_data(config)
    assert not (tmp_path / "cache").exists()


def test_the_loader_reuses_the_data_plan_preflight_made(base_job, tmp_path, monkeypatch):
    """A rank reads the manifests and indexes once: in preflight, not again in the loader."""
    from titan_moe.data import setup
    from titan_moe.data.setup import plan_data

    root = write_prep_output(tmp_path / "mix", {"a": 5, "b": 5}, seq_len=SEQ)
    config = job(base_job, tmp_path, root)
    plan = plan_data(config)

    def reread(*args, **kwargs):
        raise AssertionError("the prep output was read a second time")

    monkeypatch.setattr(setup, "read_prep_output", reread)
    loader = build_streaming_dataloader(1, 0, None, config)
    try:
        assert loader.setup is plan.train
    finally:
        loader.close()

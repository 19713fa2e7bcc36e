"""Checkpoint manager in one process: commit marker, integrity, retention, export."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from torchtitan.components.optimizer import OptimizersContainer

from titan_moe.common import storage
from titan_moe.checkpoint import CheckpointLoadError, CheckpointManager, catalog
from titan_moe.checkpoint import cli as ckpt_cli
from titan_moe.common.errors import ConfigError
from titan_moe.model import Transformer
from titan_moe.common.versions import runtime_versions
from tests.model_configs import HOMOGENEOUS, model_args


class TrainState:
    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = sd["step"]


def make(folder, keep=3, async_mode="disabled", seed=0):
    torch.manual_seed(seed)
    model = Transformer(model_args(HOMOGENEOUS))
    model.init_weights()
    opt = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-2})
    state = TrainState()
    config = SimpleNamespace(enable=True, folder=str(folder), interval=2, keep_latest_k=keep,
                             async_mode=async_mode, load_step=-1)
    mgr = CheckpointManager(model_parts=[model], optimizers=opt, lr_schedulers=None, dataloader=None,
                            train_state=state, config=config, base_folder="")
    return mgr, model, opt, state


def train_steps(model, opt, state, mgr, n):
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        state.step += 1
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # pretend loss-free balancing moved the biases
            model.layers["0"].moe.sets[0].expert_bias.add_(0.01)
        mgr.save(state.step)
    mgr.wait()


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_resume_restores_model_optimizer_biases_and_step(tmp_path, async_mode):
    mgr, model, opt, state = make(tmp_path, async_mode=async_mode)
    train_steps(model, opt, state, mgr, 4)
    infos = catalog.list_checkpoints(str(tmp_path))
    assert [(i.step, i.loadable) for i in infos] == [(2, True), (4, True)]

    mgr2, model2, opt2, state2 = make(tmp_path, seed=123)
    assert mgr2.load() is True
    assert state2.step == 4
    for (name, p), p2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, p2), name
    assert model2.layers["0"].moe.sets[0].expert_bias[0].item() == pytest.approx(0.04)
    adam = opt.optimizers[0].state_dict()["state"]
    adam2 = opt2.optimizers[0].state_dict()["state"]
    assert len(adam) == len(adam2) > 0
    for k in adam:
        assert torch.equal(adam[k]["exp_avg_sq"], adam2[k]["exp_avg_sq"])


def test_incomplete_and_truncated_checkpoints_are_skipped(tmp_path, caplog):
    mgr, model, opt, state = make(tmp_path)
    train_steps(model, opt, state, mgr, 6)
    # step-6: truncate one data file after commit; step-8: a save that never committed.
    step6 = catalog.step_path(str(tmp_path), 6)
    data_file = next(f for f in sorted(os.listdir(step6)) if f.endswith(".distcp"))
    with open(os.path.join(step6, data_file), "r+b") as f:
        f.truncate(100)
    os.makedirs(catalog.step_path(str(tmp_path), 8))
    infos = {i.step: i for i in catalog.list_checkpoints(str(tmp_path))}
    assert infos[6].committed and "100 bytes" in infos[6].problem and data_file in infos[6].problem
    assert not infos[8].committed

    mgr2, _, _, state2 = make(tmp_path, seed=5)
    assert mgr2.load() is True
    assert state2.step == 4
    assert f"step-6: file {data_file}" in caplog.text and "step-8: no COMMITTED marker" in caplog.text


def test_corrupt_bytes_that_pass_the_size_check_fall_back_then_refuse(tmp_path):
    mgr, model, opt, state = make(tmp_path, keep=2)
    train_steps(model, opt, state, mgr, 4)
    for step in (4, 2):
        path = catalog.step_path(str(tmp_path), step)
        with open(os.path.join(path, ".metadata"), "r+b") as f:
            size = f.seek(0, 2)
            f.seek(0)
            f.write(b"\0" * size)
    mgr2, *_ = make(tmp_path)
    with pytest.raises(CheckpointLoadError, match="refusing to restart from scratch"):
        mgr2.load()


def test_retention_keeps_the_last_k_committed(tmp_path):
    mgr, model, opt, state = make(tmp_path, keep=2)
    train_steps(model, opt, state, mgr, 8)
    assert [i.step for i in catalog.list_checkpoints(str(tmp_path))] == [6, 8]


def test_keep_latest_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.keep_latest_k"):
        make(tmp_path, keep=1)


def test_list_and_export_cli(tmp_path, capsys):
    mgr, model, opt, state = make(tmp_path / "ckpt")
    train_steps(model, opt, state, mgr, 2)
    assert ckpt_cli.main([str(tmp_path / "ckpt")]) == 0
    listing = capsys.readouterr().out
    assert "complete" in listing and "       2" in listing
    out = tmp_path / "model.pt"
    assert ckpt_cli.main(["export", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    exported = torch.load(out)
    assert exported["step"] == 2
    assert set(exported["model"]) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(exported["model"][k], v)


def test_checkpoints_on_object_storage(s3_bucket):
    folder = f"s3://{s3_bucket}/run/checkpoint"
    mgr, model, opt, state = make(folder, async_mode="async")
    train_steps(model, opt, state, mgr, 4)
    infos = catalog.list_checkpoints(folder)
    assert [(i.step, i.loadable) for i in infos] == [(2, True), (4, True)]
    mgr2, model2, _, state2 = make(folder, seed=9)
    assert mgr2.load() is True and state2.step == 4
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)


def test_marker_records_the_versions_that_wrote_it_and_a_same_version_resume_is_quiet(tmp_path, caplog):
    mgr, model, opt, state = make(tmp_path)
    train_steps(model, opt, state, mgr, 2)
    [info] = catalog.list_checkpoints(str(tmp_path))
    assert info.versions["torch"] == torch.__version__
    assert info.versions == runtime_versions() and set(info.versions) == {"torch", "torchtitan", "titan_moe"}
    mgr2, *_ = make(tmp_path, seed=3)
    with caplog.at_level(logging.INFO, logger="titan_moe.checkpoint.manager"):
        assert mgr2.load() is True
    assert "other library versions" not in caplog.text


def test_resume_under_another_torch_version_warns_that_it_is_not_bit_exact(tmp_path, caplog):
    mgr, model, opt, state = make(tmp_path)
    train_steps(model, opt, state, mgr, 2)
    marker = os.path.join(catalog.step_path(str(tmp_path), 2), catalog.MARKER)
    meta = storage.read_json(marker)
    meta["versions"]["torch"] = "2.9.9+other"  # as if another torch had written it
    storage.write_json(marker, meta)

    mgr2, model2, _, state2 = make(tmp_path, seed=3)
    with caplog.at_level(logging.WARNING, logger="titan_moe.checkpoint.manager"):
        assert mgr2.load() is True  # it still resumes ...
    assert state2.step == 2
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)
    # ... and says which version changed and what that costs.
    [record] = [r for r in caplog.records if "other library versions" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert f"torch 2.9.9+other -> {torch.__version__}" in record.getMessage()
    assert "bit-exact continuation is not promised" in record.getMessage()
    assert "torchtitan" not in record.getMessage()  # only what differs is named

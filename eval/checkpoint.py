"""Score a titan-moe checkpoint: rebuild the model from the run config, load DCP weights.

torchtitan saves a *flattened* state dict per step directory
(`<job.dump_folder>/<checkpoint.folder>/step-N/`): the model's parameters
and persistent buffers under their FQNs at the top level, next to the
"optimizer", "lr_scheduler", "dataloader" and "train_state" entries.  We ask
DCP for the model keys only, so any number of saving ranks (FSDP/EP shards)
reshards onto however many ranks evaluate, each holding a full replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eval.models import ModuleLogitsModel
from eval.tokenizer import TextTokenizer
from titan_moe.checkpoint import model_state
from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import MODEL_NAME, load_run_config
from titan_moe.model.args import TitanMoEModelArgs
from titan_moe.model.transformer import Transformer


@dataclass
class TrainedRunConfig:
    """The run config a checkpoint was trained with, read by the trainer's own reader.

    ``job`` is what ``titan_moe.run_config.job_config.load_run_config`` returns for the same
    TOML and overrides, so eval sees the trainer's defaults (TensorBoard is off
    unless ``[metrics].enable_tensorboard`` says otherwise, as in torchtitan).
    """

    path: Path
    job: Any

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainedRunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"{path} does not exist")
        job = load_run_config(path, overrides)
        if job.model.name != MODEL_NAME:
            raise ConfigError("model.name", f"{path} has model.name = {job.model.name!r}, not {MODEL_NAME!r}; "
                              "is it a titan-moe run config?")
        return cls(path, job)

    def model_args(self) -> TitanMoEModelArgs:
        return TitanMoEModelArgs.from_job_config(self.job)

    @property
    def dump_folder(self) -> Path:
        return Path(self.job.job.dump_folder)

    @property
    def checkpoint_folder(self) -> Path:
        return self.dump_folder / self.job.checkpoint.folder

    @property
    def tensorboard_dir(self) -> Path | None:
        if not self.job.metrics.enable_tensorboard:
            return None
        # A sibling of the trainer's timestamped runs, so both show in one TensorBoard.
        return self.dump_folder / self.job.metrics.save_tb_folder / "eval"

    def tokenizer(self, checkpoint_folder: str | None = None):
        """The run's tokenizer (titan_moe.data.run_tokenizer: assets, checkpoint copy, [data].root), or None."""
        from titan_moe.data import run_tokenizer

        return run_tokenizer.find(self.job, checkpoint_folder)


def resolve_step_dir(path: str | Path) -> tuple[Path, int]:
    """A `step-N` directory as given, or the newest complete one inside a checkpoint folder.

    "Complete" is the trainer's definition (titan_moe.checkpoint.catalog), shared with
    export through titan_moe.checkpoint.model_state.resolve.
    """
    info = model_state.resolve(str(path))
    return Path(info.path), info.step


def load_model_weights(model: torch.nn.Module, step_dir: Path) -> None:
    """Fill `model`'s parameters and persistent buffers from a torchtitan DCP step directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    state_dict = model.state_dict()
    # The same check export runs: names and shapes against the saved metadata, before any read.
    model_state.check_matches(str(step_dir), {k: tuple(v.shape) for k, v in state_dict.items()})
    # Only model keys are requested: optimizer/dataloader/train_state entries are left unread.
    dcp.load(state_dict, checkpoint_id=str(step_dir), planner=DefaultLoadPlanner())
    model.load_state_dict(state_dict)


def load_checkpoint_model(
    checkpoint: str | Path | None,
    config: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    eos_id: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[ModuleLogitsModel, TextTokenizer, dict]:
    """(model, tokenizer, source info) for a titan-moe checkpoint.

    `checkpoint` may be a step-N directory or the checkpoint folder (newest
    step taken); None means the run config's own `<dump_folder>/<checkpoint.folder>`.
    `overrides` are `--section.key value` pairs applied to the run config, as for train.
    """
    run = TrainedRunConfig.load(config, overrides)
    args = run.model_args()
    step_dir, step = resolve_step_dir(checkpoint if checkpoint is not None else run.checkpoint_folder)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)  # non-persistent buffers (RoPE tables) are not in checkpoints
    load_model_weights(model, step_dir)
    if dtype is not None:
        # Parameters only: buffers such as RoPE tables and expert biases stay in float32.
        for param in model.parameters():
            param.data = param.data.to(dtype)
    model.eval()
    if tokenizer:
        tok = TextTokenizer.load(tokenizer, eos_id=eos_id)
    else:
        from titan_moe.data.run_tokenizer import candidates

        from titan_moe.common.storage import StorageError

        try:
            found = run.tokenizer(str(step_dir.parent))
        except StorageError as exc:  # an unreachable store is not "no tokenizer": say which
            raise ConfigError("--tokenizer", f"cannot read the run's tokenizer: {exc}") from exc
        if found is None:
            raise ConfigError(
                "--tokenizer",
                f"{run.path} leads to no tokenizer (none of {', '.join(candidates(run.job, str(step_dir.parent)))} "
                "exists); pass --tokenizer PATH/tokenizer.json or a hub id, or train on data written by "
                "`titan-moe prep` (it writes [data].root/tokenizer.json)",
            )
        tok = TextTokenizer.from_text(found.text, found.source, eos_id=eos_id if eos_id is not None else found.eos_id)
    if tok.vocab_size > args.padded_vocab_size:
        raise ConfigError("--tokenizer", f"tokenizer has {tok.vocab_size} ids, the model only {args.padded_vocab_size}")
    unnamed = run.job.job.description == type(run.job.job)().description  # torchtitan's "default job"
    name = run.path.stem if unnamed else run.job.job.description
    lm = ModuleLogitsModel(model, max_seq_len=args.max_seq_len, eos_id=tok.eos_id, name=name, step=step, device=device)
    info = {"kind": "titan-moe", "checkpoint": str(step_dir), "config": str(run.path), "tokenizer": tok.source,
            "tensorboard_dir": str(run.tensorboard_dir) if run.tensorboard_dir else None}  # fmt: skip
    return lm, tok, info

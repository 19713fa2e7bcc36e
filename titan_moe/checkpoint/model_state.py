"""The model part of a checkpoint: which step, which entries, and whether a run config describes them.

Eval (``eval/checkpoint.py``) and export (``titan_moe/checkpoint/cli.py``) both
rebuild a model from a run config and fill it from a checkpoint; both go
through :func:`resolve` (a ``step-N`` folder or the newest complete step of a
checkpoint folder) and :func:`check_matches` (the config's parameter names and
shapes against the checkpoint's metadata), so a wrong ``--config`` gets the
same clear message from both, before any weight is read or file written.
"""

from __future__ import annotations

from collections.abc import Mapping

from titan_moe.common import storage
from titan_moe.checkpoint import catalog
from titan_moe.common.errors import ConfigError

# Top-level entries of a training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.", "rng.")
SHOWN = 10  # differences listed per kind; the counts say how many there are


def resolve(path: str, step: int | None = None, *, field: str = "--checkpoint") -> catalog.CheckpointInfo:
    """A complete ``step-N`` folder as given, or the newest (or ``step``) complete one inside a checkpoint folder.

    "Complete" is the trainer's definition (``catalog``): a COMMITTED marker whose
    file list matches what is stored.  Local paths and URLs alike.
    """
    path = path.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    match = catalog.STEP_DIR.match(name)
    if match:
        parent = path[: -len(name)].rstrip("/") or "."
        if step is not None and step != int(match.group(1)):
            raise ConfigError("--step", f"{path} is step {match.group(1)}, not {step}; drop --step or pass the folder")
        info = catalog.inspect(parent, int(match.group(1)))
        if not info.loadable:
            raise ConfigError(field, f"{path} cannot be loaded: {info.problem}")
        return info
    fs, root = storage.filesystem(path)
    if not fs.isdir(root):
        raise ConfigError(field, f"{path} is not a directory (pass a checkpoint folder or one of its step-N folders)")
    complete = [i for i in catalog.list_checkpoints(path) if i.loadable and (step is None or i.step == step)]
    if not complete:
        which = f"complete step-{step}" if step is not None else "complete step-N checkpoint (one with a COMMITTED marker)"
        raise ConfigError(field, f"{path} holds no {which}")
    return complete[-1]


def reader(step_dir: str):
    """A DCP storage reader for a local or object-store step folder."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    if storage.is_url(step_dir):
        return FsspecReader(step_dir, **storage.storage_options(step_dir))
    return FileSystemReader(step_dir)


def saved_model_shapes(step_dir: str) -> dict[str, tuple[int, ...] | None]:
    """Model entry -> saved shape (None for a non-tensor entry), from the checkpoint's metadata alone."""
    saved = reader(step_dir).read_metadata().state_dict_metadata
    return {k: (tuple(v.size) if hasattr(v, "size") else None) for k, v in saved.items()
            if not k.startswith(NON_MODEL_PREFIXES)}


def check_matches(step_dir: str, expected: Mapping[str, tuple[int, ...]], *, field: str = "--config") -> None:
    """Raise ConfigError listing what differs when ``expected`` (name -> shape) is not the saved model.

    Expert counts, widths, GQA heads and dense-vs-MoE all show up here as missing,
    unexpected or mis-shaped entries; DCP itself would fail with a terse error
    deep in a load, and a partial load would silently keep random weights.
    """
    saved = saved_model_shapes(step_dir)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    wrong = [f"{k}: checkpoint {saved[k]} vs config {tuple(shape)}" for k, shape in expected.items()
             if k in saved and saved[k] is not None and saved[k] != tuple(shape)]
    if missing or unexpected or wrong:
        lines = ([f"missing {k}" for k in missing[:SHOWN]] + [f"unexpected {k}" for k in unexpected[:SHOWN]]
                 + wrong[:SHOWN])
        raise ConfigError(
            field,
            f"the run config does not describe the model saved in {step_dir} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped):\n  " + "\n  ".join(lines)
            + "\npass the run config the checkpoint was trained with",
        )


def expected_shapes(args) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every entry the model of ``args`` (TitanMoEModelArgs) saves, built on the meta device."""
    import torch

    from titan_moe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}

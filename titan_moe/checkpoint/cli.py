"""``titan-moe checkpoints``: list a checkpoint folder, export a model for eval.

    titan-moe checkpoints FOLDER [--json]
    titan-moe checkpoints export FOLDER --out model.pt [--step N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from titan_moe import storage
from titan_moe.checkpoint import catalog

# Top-level entries of a training checkpoint that are not model weights.
NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.", "rng.")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def list_main(folder: str, as_json: bool) -> int:
    infos = catalog.list_checkpoints(folder)
    if as_json:
        print(json.dumps([info.__dict__ | {"loadable": info.loadable} for info in infos], indent=2))
        return 0
    if not infos:
        print(f"no checkpoints in {folder}")
        return 0
    print(f"{'step':>8}  {'saved at (UTC)':<19}  {'state':<10}  {'size':>9}  note")
    for info in infos:
        when = dt.datetime.fromtimestamp(info.saved_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if info.saved_at else "-"
        state = "complete" if info.loadable else ("damaged" if info.committed else "incomplete")
        print(f"{info.step:>8}  {when:<19}  {state:<10}  {_size(info.size_bytes):>9}  {info.problem or ''}")
    return 0


def export_model(folder: str, out: str, step: int | None) -> int:
    """Write the model weights of one checkpoint as a plain ``torch.save`` state dict."""
    infos = [i for i in catalog.list_checkpoints(folder) if i.loadable and (step is None or i.step == step)]
    if not infos:
        which = f"step-{step}" if step is not None else "any complete checkpoint"
        print(f"titan-moe checkpoints export: no {which} in {folder}", file=sys.stderr)
        return 2
    info = infos[-1]
    reader = FsspecReader(info.path, **storage.storage_options(info.path)) if storage.is_url(info.path) else FileSystemReader(info.path)
    keys = {k for k in reader.read_metadata().state_dict_metadata if not k.startswith(NON_MODEL_PREFIXES)}
    state = _load_state_dict_from_keys(keys, storage_reader=reader)
    torch.save({"step": info.step, "model": state}, out)
    print(f"exported {len(state)} tensors of {info.path} to {out}")
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "export":
        parser = argparse.ArgumentParser(prog="titan-moe checkpoints export")
        parser.add_argument("folder")
        parser.add_argument("--out", required=True, help="output file (torch.save of {'step', 'model'})")
        parser.add_argument("--step", type=int, default=None, help="default: the newest complete checkpoint")
        args = parser.parse_args(argv[1:])
        return export_model(args.folder, args.out, args.step)
    parser = argparse.ArgumentParser(prog="titan-moe checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a checkpoint folder (local path or s3:// URL)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return list_main(args.folder, args.json)

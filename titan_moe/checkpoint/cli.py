"""``titan-moe checkpoints``: list a checkpoint folder, export a model.

    titan-moe checkpoints FOLDER [--json]
    titan-moe checkpoints export FOLDER --out model.pt [--step N]
    titan-moe checkpoints export FOLDER --format hf --out HFDIR [--config RUN.toml] [--tokenizer T] [--step N]

`--format hf` writes a transformers folder (see titan_moe.checkpoint.hf_export);
the run config defaults to `config.toml` next to FOLDER (a sweep point's layout).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

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


def load_model_state(folder: str, step: int | None):
    """(checkpoint info, model state dict) of the newest complete checkpoint (or step N); None if there is none."""
    infos = [i for i in catalog.list_checkpoints(folder) if i.loadable and (step is None or i.step == step)]
    if not infos:
        return None, None
    info = infos[-1]
    reader = FsspecReader(info.path, **storage.storage_options(info.path)) if storage.is_url(info.path) else FileSystemReader(info.path)
    keys = {k for k in reader.read_metadata().state_dict_metadata if not k.startswith(NON_MODEL_PREFIXES)}
    return info, _load_state_dict_from_keys(keys, storage_reader=reader)


def export_model(folder: str, out: str, step: int | None) -> int:
    """Write the model weights of one checkpoint as a plain ``torch.save`` state dict."""
    info, state = load_model_state(folder, step)
    if info is None:
        return _no_checkpoint(folder, step)
    torch.save({"step": info.step, "model": state}, out)
    print(f"exported {len(state)} tensors of {info.path} to {out}")
    return 0


def _no_checkpoint(folder: str, step: int | None) -> int:
    which = f"step-{step}" if step is not None else "any complete checkpoint"
    print(f"titan-moe checkpoints export: no {which} in {folder}", file=sys.stderr)
    return 2


def default_config(folder: str) -> Path | None:
    """A sweep point keeps its run config next to its checkpoint folder."""
    if storage.is_url(folder):
        return None
    candidate = Path(folder).resolve().parent / "config.toml"
    return candidate if candidate.is_file() else None


def run_tokenizer(config: Path) -> tuple[str | None, int | None]:
    """(tokenizer.json, eos id) a run used: [model].hf_assets_path, else its local prep manifest."""
    import tomllib

    doc = tomllib.loads(config.read_text())
    assets = doc.get("model", {}).get("hf_assets_path")
    manifest_path = Path(str(doc.get("data", {}).get("root", ""))) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if assets and (Path(assets) / "tokenizer.json").is_file():
        return str(Path(assets) / "tokenizer.json"), manifest.get("eos_id")
    return manifest.get("tokenizer"), manifest.get("eos_id")


def export_hf(folder: str, out: str, step: int | None, config: str | None, tokenizer: str | None,
              eos_id: int | None) -> Path:
    """A transformers folder from a checkpoint; the design is checked before any weight is read."""
    from titan_moe.checkpoint.hf_export import target_architecture, write_hf_folder
    from titan_moe.errors import ConfigError
    from titan_moe.job_config import load_run_config
    from titan_moe.model.args import TitanMoEModelArgs

    config_path = Path(config) if config else default_config(folder)
    if config_path is None or not config_path.is_file():
        raise ConfigError("--config", f"pass the run config the checkpoint was trained with (no config.toml next to {folder})")
    args = TitanMoEModelArgs.from_job_config(load_run_config(config_path))
    arch = target_architecture(args)
    run_tok, run_eos = run_tokenizer(config_path)
    tokenizer = tokenizer or run_tok
    if tokenizer is None:
        raise ConfigError("--tokenizer", f"{config_path} leads to no tokenizer.json; pass --tokenizer PATH/tokenizer.json")
    info, state = load_model_state(folder, step)
    if info is None:
        which = f"step-{step}" if step is not None else "complete checkpoint"
        raise ConfigError("FOLDER", f"no {which} in {folder}")
    path = write_hf_folder(args, state, out, tokenizer_json=tokenizer, eos_id=eos_id if eos_id is not None else run_eos,
                           metadata={"checkpoint": info.path, "step": info.step, "config": str(config_path)})  # fmt: skip
    print(f"exported {info.path} as transformers {arch} to {path}")
    return path


def main(argv: list[str]) -> int:
    if argv and argv[0] == "export":
        parser = argparse.ArgumentParser(prog="titan-moe checkpoints export")
        parser.add_argument("folder")
        parser.add_argument("--out", required=True, help="pt: output file (torch.save of {'step', 'model'}); hf: a new folder")
        parser.add_argument("--step", type=int, default=None, help="default: the newest complete checkpoint")
        parser.add_argument("--format", choices=["pt", "hf"], default="pt", help="pt (default) or hf (transformers)")
        parser.add_argument("--config", help="hf: the run TOML (default: config.toml next to FOLDER)")
        parser.add_argument("--tokenizer", help="hf: tokenizer.json (default: the run config's)")
        parser.add_argument("--eos-id", type=int, help="hf: end-of-text id (default: the prep manifest's or the tokenizer's)")
        args = parser.parse_args(argv[1:])
        if args.format == "pt":
            return export_model(args.folder, args.out, args.step)
        from titan_moe.errors import ConfigError

        try:
            export_hf(args.folder, args.out, args.step, args.config, args.tokenizer, args.eos_id)
        except ConfigError as exc:
            print(f"titan-moe checkpoints export: {exc}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="titan-moe checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a checkpoint folder (local path or s3:// URL)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return list_main(args.folder, args.json)

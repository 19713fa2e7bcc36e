"""``titan-moe checkpoints``: list a checkpoint folder, export a model.

    titan-moe checkpoints FOLDER [--json]
    titan-moe checkpoints export FOLDER --out model.pt [--step N] [--force]
    titan-moe checkpoints export FOLDER --format hf --out HFDIR [--config RUN.toml] [--tokenizer T] [--step N] [--force]

FOLDER is a checkpoint folder (newest complete step, or --step N) or one
complete `step-N` folder.  `--format hf` writes a transformers folder (see
titan_moe.checkpoint.hf_export); the run config defaults to `config.toml` next
to the checkpoint folder (a sweep point's layout) and must describe the saved
model (names and shapes are checked before anything is written).  An
existing --out is replaced only with --force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from titan_moe.common import storage
from titan_moe.checkpoint import catalog, model_state
from titan_moe.common.errors import ConfigError


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


def load_model_state(info: catalog.CheckpointInfo) -> dict:
    """The model entries (optimizer, data loader, ... left unread) of one complete checkpoint."""
    reader = model_state.reader(info.path)
    keys = set(model_state.saved_model_shapes(info.path))
    return _load_state_dict_from_keys(keys, storage_reader=reader)


def check_out(out: str, *, folder: bool, force: bool) -> Path:
    """Refuse an ``--out`` that cannot be written or would be overwritten silently, before anything is read."""
    path = Path(out)
    for ancestor in path.parents:
        if ancestor.exists() and not ancestor.is_dir():
            raise ConfigError("--out", f"{ancestor} is a file, not a folder; pass a path in a folder")
    if folder:
        if path.exists() and not path.is_dir():
            raise ConfigError("--out", f"{path} is a file; --format hf writes a folder: pass a new folder name")
        if path.is_dir() and any(path.iterdir()) and not force:
            raise ConfigError("--out", f"{path} exists and is not empty; choose a new folder or pass --force to replace it")
    else:
        if path.is_dir():
            raise ConfigError("--out", f"{path} is a folder; --format pt writes one file, e.g. {path / 'model.pt'}")
        if path.exists() and not force:
            raise ConfigError("--out", f"{path} exists; choose a new file or pass --force to overwrite it")
    return path


def export_model(folder: str, out: str, step: int | None, force: bool = False) -> Path:
    """Write the model weights of one checkpoint as a plain ``torch.save`` state dict (all or nothing)."""
    path = check_out(out, folder=False, force=force)
    info = model_state.resolve(folder, step, field="FOLDER")
    state = load_model_state(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"step": info.step, "model": state}, tmp)
        os.replace(tmp, path)  # a reader sees the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {len(state)} tensors of {info.path} to {path}")
    return path


def default_config(folder: str) -> Path | None:
    """A sweep point keeps its run config next to its checkpoint folder (or next to the folder of a step-N)."""
    if storage.is_url(folder):
        return None
    here = Path(folder).resolve()
    if catalog.STEP_DIR.match(here.name):
        here = here.parent
    candidate = here.parent / "config.toml"
    return candidate if candidate.is_file() else None


def export_hf(folder: str, out: str, step: int | None, config: str | None, tokenizer: str | None,
              eos_id: int | None, force: bool = False) -> Path:
    """A transformers folder from a checkpoint; design, config and tokenizer are checked before any weight is read."""
    from titan_moe.checkpoint.hf_export import target_architecture, write_hf_folder
    from titan_moe.data import run_tokenizer
    from titan_moe.run_config.job_config import load_run_config
    from titan_moe.model.args import TitanMoEModelArgs

    config_path = Path(config) if config else default_config(folder)
    if config_path is None or not config_path.is_file():
        raise ConfigError("--config", f"pass the run config the checkpoint was trained with (no config.toml next to {folder})")
    out_path = check_out(out, folder=True, force=force)
    job = load_run_config(config_path)
    args = TitanMoEModelArgs.from_job_config(job)
    arch = target_architecture(args)
    info = model_state.resolve(folder, step, field="FOLDER")
    model_state.check_matches(info.path, model_state.expected_shapes(args), field="--config")
    checkpoint_folder = info.path.rstrip("/").rsplit("/", 1)[0]
    if tokenizer:
        tok_text, tok_source, run_eos = _read_tokenizer(tokenizer), tokenizer, None
    else:
        found = run_tokenizer.find(job, checkpoint_folder)
        if found is None:
            raise ConfigError("--tokenizer", f"{config_path} leads to no tokenizer.json (tried "
                              f"{', '.join(run_tokenizer.candidates(job, checkpoint_folder))}); pass --tokenizer PATH")
        tok_text, tok_source, run_eos = found.text, found.source, found.eos_id
    state = load_model_state(info)
    path = write_hf_folder(args, state, out_path, tokenizer_text=tok_text, tokenizer_source=tok_source,
                           eos_id=eos_id if eos_id is not None else run_eos, replace=force,
                           metadata={"checkpoint": info.path, "step": info.step, "config": str(config_path)})  # fmt: skip
    print(f"exported {info.path} as transformers {arch} to {path}")
    return path


def _read_tokenizer(spec: str) -> str:
    """--tokenizer: a tokenizer.json path or URL, or a folder holding one."""
    url = spec if spec.endswith(".json") else storage.join(spec, "tokenizer.json")
    parent, _, name = url.rpartition("/")
    raw = storage.Store(parent or ".").read_bytes(name)
    if raw is None:
        raise ConfigError("--tokenizer", f"no tokenizer.json at {url}")
    return raw.decode()


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
        parser.add_argument("--force", action="store_true", help="replace an existing --out (never done silently)")
        args = parser.parse_args(argv[1:])
        try:
            if args.format == "pt":
                export_model(args.folder, args.out, args.step, args.force)
            else:
                export_hf(args.folder, args.out, args.step, args.config, args.tokenizer, args.eos_id, args.force)
        except (ConfigError, storage.StorageError) as exc:
            print(f"titan-moe checkpoints export: {exc}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="titan-moe checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a checkpoint folder (local path or s3:// URL)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return list_main(args.folder, args.json)

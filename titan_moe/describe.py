"""``titan-moe describe RUN.toml [--json] [--] [--section.key value ...]``: what a run config builds.

The config is read exactly as ``titan-moe train`` reads it (``titan_moe.run_config.job_config``),
overrides included, so describe shows the model a train command would build.
"""

from __future__ import annotations

import argparse
import json
import sys

from typing import Any

from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import load_run_config
from titan_moe.run_config.overrides import parse_args_and_overrides
from titan_moe.model.accounting import describe
from titan_moe.model.args import TitanMoEModelArgs


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_description(d: dict) -> str:
    lines = [
        f"{d['kind']} decoder: {d['n_layers']} layers, dim {d['dim']}, {d['n_heads']} heads x {d['head_dim']}, "
        f"ffn_hidden {d['ffn_hidden']}, vocab {d['vocab_size']} (padded {d['padded_vocab_size']})",
        f"  total params      {d['total_params']:>15,}  ({_human(d['total_params'])})",
        f"  active params     {d['active_params']:>15,}  ({_human(d['active_params'])})",
        f"  embedding params  {d['embedding_params']:>15,}",
        f"  FLOPs per token   {d['flops_per_token']:>15,}  (seq_len {d['seq_len']})",
    ]
    if d["kind"] == "moe":
        lines.append(f"  routing {d['routing']}; active FFN compute = {d['flop_ratio']} x dense "
                     f"({'FLOP-matched' if d['flop_matched'] else 'NOT FLOP-matched'})")
        for i, s in enumerate(d["expert_sets"]):
            lines.append(
                f"  set {i}: {s['num_experts']} experts x granularity {s['granularity']} (hidden {s['hidden_dim']}), "
                f"top-{s['top_k']}, sparsity {s['sparsity']:g}"
            )
        if d["generalist_hidden_dim"]:
            lines.append(f"  generalist: granularity {d['generalist_granularity']} (hidden {d['generalist_hidden_dim']})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titan-moe describe", description=__doc__.split("\n\n")[0],
                                     epilog="Other --section.key value pairs override the run config, as for train.")
    parser.add_argument("config", help="run config TOML with [arch] and [moe] sections")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    return parser


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return parse_args_and_overrides(build_parser(), argv)


def read_config(argv: list[str]) -> Any:
    """The run config ``titan-moe describe ARGV`` describes."""
    args, overrides = parse_command_line(argv)
    return load_run_config(args.config, overrides)


def main(argv: list[str]) -> int:
    args = None
    try:
        args, overrides = parse_command_line(argv)
        run = load_run_config(args.config, overrides)
        model_args = TitanMoEModelArgs.from_job_config(run)
    except ConfigError as exc:
        where = f" {args.config}" if args is not None else ""
        print(f"titan-moe describe: invalid config{where}: {exc}", file=sys.stderr)
        return 2
    d = describe(model_args)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0

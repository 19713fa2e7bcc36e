"""``titan-moe gpu-check [--smoke] [--out gpu_check.json]``: prove the MoE hot path on one GPU.

For a fresh H200 machine with torch 2.11 and the project installed.  Four
stages, each in its own process under its own deadline (under 25 minutes in
all, 20 of them the bench's repeats), write ``gpu_check.json`` and print a table:

1. ``grouped_vs_loop``: grouped-GEMM and loop experts give equal outputs and
   equal gradients for every parameter and the input (bf16 tolerance) at the
   OLMoE-1B-7B expert shape (64 experts, hidden 1024, dim 2048, top-8),
   dropless and capacity;
2. ``host_syncs``: host-device synchronisations of one MoE layer forward and
   backward, counted by ``torch.cuda.set_sync_debug_mode`` (expected 0), and
   the ops that force one (``.item()``, ``nonzero``, ...) counted by a
   dispatch mode;
3. ``train_compiled``: 40 trainer steps of a small MoE with ``compile.enable``
   and bf16; the loss must fall;
4. ``bench``: ``titan-moe bench`` at the OLMoE-1B-7B shape against
   torchtitan's own MoE, both compiled, 5 interleaved repeats each: tokens/s,
   MFU, peak memory, the median ratio and its interval; it passes only when
   the low end of the interval clears 1.1x (and of MFU, 40 %).

``--smoke`` runs every stage at toy shapes on CPU (what CI runs).  There the
CUDA sync counter does not exist and stage 2 says so; the dispatch-mode count
still applies.  Exit status 0 only when every stage passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titan_moe.configs import shipped
from titan_moe.common.errors import ConfigError

REPORT_NAME = "gpu_check.json"



@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    deadline_s: float  # on a GPU
    smoke_deadline_s: float  # --smoke on a (loaded, 2-core) CPU


STAGES = [
    Stage("grouped_vs_loop", "grouped vs loop experts: outputs and gradients", 60, 240),
    Stage("host_syncs", "host syncs per MoE layer fwd+bwd", 45, 240),
    Stage("train_compiled", "trainer steps, compile + bf16: loss falls", 120, 600),
    # 2 x BENCH_REPEATS fresh processes, each starting, compiling (cached after the first) and training.
    Stage("bench", "titan-moe bench vs torchtitan's MoE, interleaved repeats", 1200, 1200),
]

# OLMoE-1B-7B's expert shape and one 4096-token sequence; toy shapes for --smoke.
FULL_SHAPE = {"num_experts": 64, "hidden": 1024, "dim": 2048, "top_k": 8, "tokens": 4096}
SMOKE_SHAPE = {"num_experts": 8, "hidden": 16, "dim": 32, "top_k": 2, "tokens": 64}
# bf16 compare: max |a - b| relative to max |b|, per tensor.
BF16_RTOL = 2e-2
# One H200 cannot hold the 16-layer 6.9B-parameter model with fp32 AdamW state plus
# activations at seq 4096; the bench drops to this many layers and says so.
BENCH_LAYERS_ONE_GPU = 8
# What the bench stage must reach on one H200 (MFU against 989 TFLOP/s dense bf16).
BENCH_TARGET_RATIO, BENCH_TARGET_MFU = 1.1, 40.0
# Runs of each engine: the fewest whose min..max is a 90% interval for the median ratio.
BENCH_REPEATS = 5


# -- sync counting --------------------------------------------------------------
class _SyncOps(TorchDispatchMode):
    """Counts the aten ops that make a GPU stream wait for the host (or vice versa)."""

    ALWAYS = {"aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.masked_select",
              "aten.unique_consecutive", "aten._unique2", "aten.masked_scatter"}

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        if name in self.ALWAYS:
            self.counts[name] += 1
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and func.__name__.endswith("Tensor"):
            self.counts[name + " (no output_size)"] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            self.counts[name + " (boolean mask)"] += 1
        return func(*args, **kwargs)


def count_sync_ops(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn`` and return the sync-forcing ops it dispatched (forward and backward)."""
    mode = _SyncOps()
    # .tolist() reads memory without dispatching an op: count it at the Python level.
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        mode.counts["Tensor.tolist"] += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with mode:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    return dict(mode.counts)


def count_cuda_syncs(fn: Callable[[], Any]) -> int:
    """Synchronising CUDA calls ``fn`` makes, as ``torch.cuda.set_sync_debug_mode("warn")`` reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# -- stages (each runs in its own process) ----------------------------------------
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _expert_set(shape: dict, routing: str, grouped: bool, device: torch.device):
    from titan_moe.model.args import ExpertSetArgs, MoEArgs
    from titan_moe.model.moe import ExpertSet

    moe = MoEArgs(enabled=True, expert_sets=[ExpertSetArgs(shape["num_experts"], 1, shape["top_k"])],
                  routing=routing, capacity_factor=1.0)
    torch.manual_seed(0)
    s = ExpertSet(shape["dim"], shape["hidden"], shape["num_experts"], shape["top_k"], moe, use_grouped_mm=grouped)
    s.init_weights(0.02, None)
    return s.to(device=device, dtype=torch.bfloat16)


def _fwd_bwd(s, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = s(x)
    (out.float() * upstream).sum().backward()
    grads = {name: p.grad for name, p in s.named_parameters()} | {"input": x.grad}
    return out.detach(), grads


def stage_grouped_vs_loop(smoke: bool) -> dict:
    shape, device = (SMOKE_SHAPE if smoke else FULL_SHAPE), _device()
    torch.manual_seed(1)
    x = torch.randn(shape["tokens"], shape["dim"], device=device, dtype=torch.bfloat16)
    upstream = torch.randn(shape["tokens"], shape["dim"], device=device)
    details, worst = {"shape": shape, "dtype": "bfloat16", "rtol": BF16_RTOL}, 0.0
    for routing in ("dropless", "capacity"):
        (out_l, g_l), (out_g, g_g) = (_fwd_bwd(_expert_set(shape, routing, grouped, device), x, upstream)
                                      for grouped in (False, True))
        errors = {"output": _rel(out_g, out_l)} | {f"grad {name}": _rel(g_g[name], g_l[name]) for name in g_l}
        details[routing] = errors
        worst = max(worst, *errors.values())
    return {"passed": worst <= BF16_RTOL, "summary": f"max rel. difference {worst:.2e} (<= {BF16_RTOL:g})",
            "details": details}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def stage_host_syncs(smoke: bool) -> dict:
    shape, device = (SMOKE_SHAPE if smoke else FULL_SHAPE), _device()
    torch.manual_seed(1)
    x = torch.randn(shape["tokens"], shape["dim"], device=device, dtype=torch.bfloat16)
    upstream = torch.randn(shape["tokens"], shape["dim"], device=device)
    details, total = {"shape": shape}, 0
    for routing in ("dropless", "capacity"):
        s = _expert_set(shape, routing, grouped=True, device=device)
        _fwd_bwd(s, x, upstream)  # warm-up: lazy initialisation may sync once
        ops = count_sync_ops(lambda: _fwd_bwd(s, x, upstream))
        cuda = count_cuda_syncs(lambda: _fwd_bwd(s, x, upstream)) if device.type == "cuda" else None
        details[routing] = {"sync_ops": ops, "cuda_syncs": cuda if cuda is not None else "n/a on CPU"}
        total += sum(ops.values()) + (cuda or 0)
    how = "torch.cuda.set_sync_debug_mode + sync-op count" if device.type == "cuda" else \
        "sync-op count only (CUDA sync counter n/a on CPU)"
    return {"passed": total == 0, "summary": f"{total} syncs per layer fwd+bwd ({how})", "details": details}


def _trainer(argv: list[str], folder: Path, nproc: int = 1) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--local-ranks-filter", "0", "-m", "titan_moe.train", *argv, "--job.dump_folder", str(folder),
           "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard", "--checkpoint.no-enable"]
    with open(folder / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer exited {proc.returncode}:\n{(folder / 'train.log').read_text()[-3000:]}")
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def stage_train_compiled(smoke: bool, workdir: Path) -> dict:
    steps = 12 if smoke else 40
    argv = ["--job.config_file", str(shipped("tiny_moe")), "--training.steps", str(steps),
            "--compile.enable", "--training.mixed_precision_param", "bfloat16", "--moe.expert_impl", "grouped",
            "--lr_scheduler.warmup_steps", "2"]
    if smoke:  # one CPU process has no FSDP to cast parameters: bf16 comes from torchtitan's autocast
        argv += ["--training.seq_len", "32"]
    rows = _trainer(argv, workdir / "train_compiled")
    losses = [r["loss_metrics/global_avg_loss"] for r in rows]
    window = max(2, len(losses) // 5)
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    return {"passed": len(losses) == steps and last < first - 0.05,
            "summary": f"{len(losses)} steps, loss {first:.3f} -> {last:.3f} (mean of first/last {window})",
            "details": {"losses": losses}}


def bench_meets_targets(summary: dict) -> bool:
    """The GPU targets, applied to the low end of each interval, so a lucky repeat cannot pass the check."""
    return summary["ratio_low"] >= BENCH_TARGET_RATIO and summary["verdict"] == "faster" and \
        summary["titan_moe"]["MFU % interval"][0] >= BENCH_TARGET_MFU


def stage_bench(smoke: bool, workdir: Path) -> dict:
    """``titan-moe bench``, interleaved repeats; on the GPU it passes only when each interval clears its target."""
    from titan_moe import bench

    if smoke:  # a few short runs: proves interleaving and the summary end to end, not the speed
        config, steps, repeats = "bench_cpu_small", 3, 2
        extra, note = ["--arch.n_layers", "1"], "CPU smoke: 1 layer, 1 timed step per run, no targets"
    else:
        config, steps, repeats = "bench_olmoe_1b7b", 8, BENCH_REPEATS
        extra = ["--arch.n_layers", str(BENCH_LAYERS_ONE_GPU)]
        note = (f"{BENCH_LAYERS_ONE_GPU} of 16 layers: 16 layers with fp32 AdamW state and seq-4096 "
                "activations do not fit one H200")
    out = workdir / "bench"
    status = bench.main([config, "--nproc", "1", "--steps", str(steps), "--repeats", str(repeats),
                         "--target", str(BENCH_TARGET_RATIO), "--out", str(out), *extra])
    summary = json.loads((out / "summary.json").read_text())
    ours, base = summary["titan_moe"], summary["baseline"]
    mfu_low = ours["MFU % interval"][0]
    line = (f"{summary['ratio_median']:.2f}x torchtitan tokens/s ({summary['ratio_low']:.2f}-"
            f"{summary['ratio_high']:.2f}, {summary['ratio_coverage']:.0%} interval, {repeats} repeats): "
            f"{summary['verdict']}; MFU {ours['MFU %']:.1f}% (low {mfu_low:.1f}%) vs {base['MFU %']:.1f}%; "
            f"peak mem {ours.get('peak memory GiB', float('nan')):.1f} vs "
            f"{base.get('peak memory GiB', float('nan')):.1f} GiB")
    passed = status == 0 and (smoke or bench_meets_targets(summary))
    if not smoke:
        note += (f"; targets: interval low >= {BENCH_TARGET_RATIO}x tokens/s and MFU interval low "
                 f">= {BENCH_TARGET_MFU:g}%")
    return {"passed": passed, "summary": f"{line} ({note})", "details": summary | {"note": note}}


def run_stage(name: str, smoke: bool, workdir: Path) -> dict:
    if name == "grouped_vs_loop":
        return stage_grouped_vs_loop(smoke)
    if name == "host_syncs":
        return stage_host_syncs(smoke)
    if name == "train_compiled":
        return stage_train_compiled(smoke, workdir)
    if name == "bench":
        return stage_bench(smoke, workdir)
    raise ValueError(f"unknown stage {name!r}")


# -- driver --------------------------------------------------------------------------
def _spawn(stage: Stage, smoke: bool, workdir: Path, deadline: float) -> dict:
    result_file = workdir / f"{stage.name}.json"
    cmd = [sys.executable, "-m", "titan_moe.gpu_check", "--run-stage", stage.name, "--workdir", str(workdir)]
    cmd += ["--smoke"] if smoke else []
    start = time.monotonic()
    with open(workdir / f"{stage.name}.log", "w") as log:
        # Own session: a deadline kills the stage and every process it started (torchrun, trainers).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "summary": f"no result within the {deadline:.0f} s deadline",
                    "seconds": round(time.monotonic() - start, 1)}
    seconds = round(time.monotonic() - start, 1)
    if proc.returncode != 0 or not result_file.exists():
        tail = (workdir / f"{stage.name}.log").read_text()[-2000:]
        return {"status": "error", "summary": f"exit {proc.returncode}; log {workdir / (stage.name + '.log')}",
                "seconds": seconds, "log_tail": tail}
    result = json.loads(result_file.read_text())
    return {"status": "pass" if result["passed"] else "fail", "summary": result["summary"], "seconds": seconds,
            "details": result["details"]}


def format_table(stages: list[dict]) -> str:
    lines = [f"{'stage':<17}{'result':<9}{'time':>14}  summary"]
    for s in stages:
        lines.append(f"{s['stage']:<17}{s['status']:<9}{s['seconds']:>7.1f}/{s['deadline_s']:<5.0f}s  {s['summary']}")
    return "\n".join(lines)


def report_path(out: str) -> Path:
    """Where the report goes, decided before any stage runs (they take minutes; a bad --out must not waste them).

    An existing folder gets ``REPORT_NAME`` inside it; a file path needs a folder
    (created when missing) and must not be a folder itself.
    """
    path = Path(out)
    if path.is_dir():
        path = path / REPORT_NAME
        if path.is_dir():
            raise ConfigError("--out", f"{path} is a folder; pass a file path for the report")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise ConfigError("--out", f"{ancestor} is a file, not a folder; pass a path in a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--out", f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError("--out", f"{path} is not writable; pass a path you can write")
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="titan-moe gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy shapes on CPU (CI)")
    parser.add_argument("--out", default=REPORT_NAME,
                        help=f"JSON report path, or a folder to write {REPORT_NAME} into (default ./{REPORT_NAME})")
    parser.add_argument("--stages", default=",".join(s.name for s in STAGES), help="comma-separated subset")
    parser.add_argument("--deadline-scale", type=float, default=1.0, help="multiply every stage's deadline")
    parser.add_argument("--workdir", default=None, help="stage logs and outputs (default: a temporary folder)")
    parser.add_argument("--run-stage", default=None, help=argparse.SUPPRESS)  # one stage, in this process
    args = parser.parse_args(argv)

    if args.run_stage:
        workdir = Path(args.workdir)
        result = run_stage(args.run_stage, args.smoke, workdir)
        (workdir / f"{args.run_stage}.json").write_text(json.dumps(result, indent=1, default=str))
        return 0

    wanted = args.stages.split(",")
    unknown = sorted(set(wanted) - {s.name for s in STAGES})
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; valid: {', '.join(s.name for s in STAGES)}")
    try:
        out = report_path(args.out)
    except ConfigError as exc:
        print(f"titan-moe gpu-check: {exc}", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("titan-moe gpu-check: no CUDA device; use --smoke for the CPU run", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"[gpu-check] {device}, torch {torch.__version__}, stage logs in {workdir}", flush=True)
    results = []
    for stage in (s for s in STAGES if s.name in wanted):
        deadline = (stage.smoke_deadline_s if args.smoke else stage.deadline_s) * args.deadline_scale
        print(f"[gpu-check] {stage.name}: {stage.what} (deadline {deadline:.0f} s)", flush=True)
        outcome = _spawn(stage, args.smoke, workdir, deadline)
        results.append({"stage": stage.name, "what": stage.what, "deadline_s": deadline} | outcome)
        print(f"[gpu-check] {stage.name}: {outcome['status']} -- {outcome['summary']}", flush=True)
    passed = all(r["status"] == "pass" for r in results)
    report = {"device": device, "torch": torch.__version__, "smoke": args.smoke, "passed": passed, "stages": results}
    out.write_text(json.dumps(report, indent=1, default=str))
    print("\n" + format_table(results) + f"\n\n{'all stages passed' if passed else 'FAILED'}; report {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""How long a checkpoint save blocks the training loop: async vs synchronous, same model, same run.

    python -m benchmarks.checkpoint_blocking [--dim 512 --layers 4 --experts 16 --saves 3] [--repeats 5]

Trains a MoE model on one process and saves every other step, once with
``async_mode = "disabled"`` and once with ``"async"``, timing (a) the time the
``save()`` call itself holds the loop and (b) the mean wall time per step,
saves included.  The two modes alternate, ``--repeats`` times each (disabled,
async, disabled, async, ...); each pair gives one ratio sync / async, and the
median ratio with its interval and a verdict against the aim (>= 4) come
from ``titan_moe.common.bench_stats``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torchtitan.components.optimizer import OptimizersContainer

from titan_moe.common import bench_stats
from titan_moe.checkpoint import CheckpointManager
from titan_moe.model import TitanMoEModelArgs, Transformer


class _Step:
    step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = sd["step"]


def measure(mode: str, args, folder: str) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model_args = TitanMoEModelArgs.from_sections(
        {"dim": args.dim, "n_layers": args.layers, "n_heads": 8, "ffn_hidden": 4 * args.dim, "vocab_size": 8192},
        {"enabled": True, "expert_sets": [{"num_experts": args.experts, "granularity": "1/4", "top_k": 4}]},
        seq_len=128,
    )
    model = Transformer(model_args)
    model.init_weights()
    opt = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-4})
    state = _Step()
    config = SimpleNamespace(enable=True, folder=folder, interval=2, keep_latest_k=2, async_mode=mode, load_step=-1)
    mgr = CheckpointManager(model_parts=[model], optimizers=opt, lr_schedulers=None, dataloader=None,
                            train_state=state, config=config, base_folder="")
    tokens = torch.randint(0, 8192, (4, 129))
    blocked, step_times = 0.0, []
    for _ in range(2 * args.saves + 1):
        state.step += 1
        begin = time.perf_counter()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        mgr.maybe_wait_for_staging()
        opt.step()
        before_save = time.perf_counter()
        mgr.save(state.step)
        blocked += time.perf_counter() - before_save
        step_times.append(time.perf_counter() - begin)
    mgr.close()
    params = sum(p.numel() for p in model.parameters())
    return blocked / args.saves, sum(step_times) / len(step_times), params


AIM = 4.0  # sync blocks at least this many times longer than async


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each mode, alternating (default 5)")
    args = parser.parse_args()

    def run(mode: str):
        def one(i: int) -> tuple[float, float, int]:
            with tempfile.TemporaryDirectory() as folder:
                return measure(mode, args, folder)
        return one

    def progress(i: int, r: dict) -> None:
        sync, asyn = r["disabled"][0], r["async"][0]
        print(f"repeat {i + 1}/{args.repeats}: blocked per save sync {sync:.3f} s, async {asyn:.3f} s, "
              f"ratio {sync / max(asyn, 1e-9):.1f}", flush=True)

    results = bench_stats.interleave({"disabled": run("disabled"), "async": run("async")}, args.repeats, progress)
    params = results["async"][0][2]
    print(f"model: {params / 1e6:.1f}M params (+ Adam state), {args.saves} saves per run, "
          f"{args.repeats} runs per mode (alternating), CPU, local disk")
    print(f"{'mode':<10} {'blocked per save (s), median (min-max)':>40} {'mean step incl. saves (s)':>26}")
    for mode, runs in results.items():
        blocked = bench_stats.median_interval([r[0] for r in runs])
        step = bench_stats.median_interval([r[1] for r in runs])  # the median; its interval is not printed
        spread = f"{blocked.median:.3f} ({blocked.minimum:.3f}-{blocked.maximum:.3f})"
        print(f"{mode:<10} {spread:>40} {step.median:>26.3f}")
    ratio = bench_stats.ratio_interval([r[0] for r in results["disabled"]],
                                       [max(r[0], 1e-9) for r in results["async"]])
    print("sync blocks the loop longer than async: " + bench_stats.describe_verdict(ratio, AIM, "sync / async"))


if __name__ == "__main__":
    main()

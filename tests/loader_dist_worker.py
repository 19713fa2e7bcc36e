"""torchrun worker for the loader's multi-process tests (``test_loader_distributed.py``).

Every rank builds the real loader through ``build_streaming_dataloader`` from
a run config, reads batches, and saves/loads the loader state with DCP the way
torchtitan's checkpointer does.  Rank 0 writes what each rank saw to JSON.

    torchrun --nproc_per_node 2 tests/loader_dist_worker.py WORKDIR run|resume

``WORKDIR/settings.json``: ``{name: {"config": TOML, "steps": N, "stop": S}}``.

* ``run``: per setting, an uninterrupted run of N steps ("full"); a run stopped
  after S steps whose loader state goes to ``WORKDIR/ckpt/<name>`` (DCP); a fresh
  loader restored from it reading steps S+1.. ("resumed").  Then the per-source
  validation sums of a fixed tiny model ("validation").  -> ``run.json``
  The same through the torchtitan validator hookup (``build_streaming_validator``
  with torchtitan's ParallelDims and MetricsProcessor) into TensorBoard under
  ``WORKDIR/validator``.
* ``resume``: fresh processes restore each checkpoint and read steps S+1..N.
  -> ``resume.json``
"""

from __future__ import annotations

if __name__ == "__main__":
    # torchtitan on CPU (the trainer's own adapter); must precede any torchtitan import.
    from titan_moe.infra import platform

    platform.activate()

import hashlib
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchtitan.components.loss import cross_entropy_loss

from titan_moe.data.loader import build_streaming_dataloader
from titan_moe.data.validation import build_streaming_validator, build_validation_loaders, evaluate_sources
from titan_moe.run_config.job_config import parse_run_config

VALIDATOR_STEP = 7


class TinyLM(torch.nn.Module):
    """A fixed random bigram model: enough to give every token a different loss."""

    def __init__(self, vocab: int = 65536, dim: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=generator))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=generator))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens] @ self.out


def read_steps(loader, steps: int) -> list[dict]:
    """What this rank saw at each step: sample ids and a hash of inputs + labels."""
    out = []
    for _, (inputs, labels) in zip(range(steps), loader):
        digest = hashlib.sha1(inputs["input"].numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        out.append({"ids": loader.last_ids.tolist(), "hash": digest})
    return out


def gathered(records):
    """Rank-major list of every rank's records, on every rank."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return everyone


def run_validator(job_config, dump_folder: Path, rank: int, world: int) -> None:
    """The trainer's hookup: torchtitan ParallelDims + MetricsProcessor (TensorBoard)."""
    from torchtitan.components.metrics import build_metrics_processor
    from torchtitan.distributed import ParallelDims

    job_config.job.dump_folder = str(dump_folder)
    job_config.metrics.enable_tensorboard = True
    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world)
    parallel_dims.build_mesh()
    metrics = build_metrics_processor(job_config, parallel_dims)
    validator = build_streaming_validator(
        job_config=job_config, dp_world_size=world, dp_rank=rank, tokenizer=None,
        parallel_dims=parallel_dims, loss_fn=cross_entropy_loss, validation_context=nullcontext,
        maybe_enable_amp=nullcontext(), metrics_processor=metrics,
    )
    assert validator.should_validate(VALIDATOR_STEP) is False and validator.should_validate(1)
    validator.validate([TinyLM()], step=VALIDATOR_STEP)
    validator.close()
    metrics.logger.close()


def main(workdir: Path, phase: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    settings = json.loads((workdir / "settings.json").read_text())
    results = {}
    for name, setting in settings.items():
        job_config = parse_run_config(["--job.config_file", setting["config"]])
        ckpt = str(workdir / "ckpt" / name)

        def build(job_config=job_config):
            return build_streaming_dataloader(world, rank, None, job_config)

        if phase == "run":
            loader = build()
            full = read_steps(loader, setting["steps"])
            loader.close()
            loader = build()
            read_steps(loader, setting["stop"])
            dcp.save({"dataloader": loader}, checkpoint_id=ckpt)
            loader.close()
        loader = build()
        dcp.load({"dataloader": loader}, checkpoint_id=ckpt)
        resumed = read_steps(loader, setting["steps"] - setting["stop"])
        loader.close()
        results[name] = {"resumed": gathered(resumed)}
        if phase == "run":
            results[name]["full"] = gathered(full)
    if phase == "run":
        job_config = parse_run_config(["--job.config_file", next(iter(settings.values()))["config"]])
        loaders = build_validation_loaders(world, rank, job_config)
        sums = evaluate_sources(TinyLM(), loaders, cross_entropy_loss)
        next(iter(loaders.values())).store.close()
        results["validation"] = {k: list(v) for k, v in sums.items()}
        run_validator(job_config, workdir / "validator", rank, world)
    if rank == 0:
        (workdir / f"{phase}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

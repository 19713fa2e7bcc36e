"""Checks a run config before any process group starts.

torchtitan 0.2.2 only discovers a bad device mesh inside ``init_process_group``
/ ``ParallelDims`` (as an ``AssertionError`` on every rank, after the
rendezvous) and a non-divisible expert count deep inside ``distribute_tensor``.
``plan_run`` raises a ``ConfigError`` naming the field instead (also for a
``[data]`` section whose root, manifests or mixture do not work, a
``[checkpoint]`` the manager would refuse, or a ``[profiling]`` schedule
torchtitan would assert on), and is called by both ``titan-moe train`` (before
torchrun is spawned) and ``titan_moe.train`` (before the Trainer is built).
It returns the ``RunPlan`` the rank's builders then reuse: model args are built
and manifests read once per process.

The mesh rules mirror ``ParallelDims._validate``/``build_mesh``: EP ranks are
borrowed from the FSDP (and TP) dimension -- torchtitan's "dp2ep" layout -- so
``expert_parallel_degree`` must divide ``data_parallel_shard_degree *
context_parallel_degree * tensor_parallel_degree``.
"""

from dataclasses import dataclass
from typing import Any

from titan_moe.common.errors import ConfigError
from titan_moe.run_config.job_config import DATASETS, MODEL_NAME
from titan_moe.model.args import TitanMoEModelArgs


@dataclass(frozen=True)
class Mesh:
    """Resolved parallel degrees (dp_shard filled in when it was -1)."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts (the ranks left after EP)."""
        return self.dp_shard // self.ep


def model_args_from_config(job_config: Any) -> TitanMoEModelArgs:
    """Build and validate the model from ``[arch]``, ``[moe]`` and ``[training].seq_len``."""
    return TitanMoEModelArgs.from_job_config(job_config)


def check_mesh(parallelism: Any, world_size: int, expert_counts: list[int]) -> Mesh:
    """Validate the parallel degrees for ``world_size`` ranks; ``expert_counts`` per expert set."""
    p = parallelism
    degrees = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "expert_parallel_degree": p.expert_parallel_degree,
        "expert_tensor_parallel_degree": p.expert_tensor_parallel_degree,
    }
    for name, value in degrees.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallelism.{name}", f"must be an integer >= 1, got {value!r}")
    for name in ("context_parallel_degree", "tensor_parallel_degree", "pipeline_parallel_degree",
                 "expert_tensor_parallel_degree"):
        if degrees[name] != 1:
            raise ConfigError(
                f"parallelism.{name}",
                f"titan-moe trains with FSDP/HSDP and expert parallelism only; set {name} = 1",
            )
    if world_size < 1:
        raise ConfigError("world_size", f"must be >= 1, got {world_size}")

    dp_replicate, ep = p.data_parallel_replicate_degree, p.expert_parallel_degree
    dp_shard = p.data_parallel_shard_degree
    if dp_shard == -1:
        if world_size % dp_replicate:
            raise ConfigError(
                "parallelism.data_parallel_replicate_degree",
                f"{dp_replicate} does not divide the world size {world_size}",
            )
        dp_shard = world_size // dp_replicate
    elif not isinstance(dp_shard, int) or dp_shard < 1:
        raise ConfigError("parallelism.data_parallel_shard_degree", f"must be -1 (fill) or >= 1, got {dp_shard!r}")
    if dp_replicate * dp_shard != world_size:
        raise ConfigError(
            "parallelism.data_parallel_shard_degree",
            f"data_parallel_replicate_degree {dp_replicate} x data_parallel_shard_degree {dp_shard} = "
            f"{dp_replicate * dp_shard} ranks, but the world size is {world_size}; "
            f"set data_parallel_shard_degree = -1 to use all ranks",
        )

    if dp_replicate > 1 and dp_shard == 1:
        # torchtitan 0.2.2 applies DDP here, which *averages* gradients although the loss is
        # already divided by the global token count: every gradient would shrink by 1/dp.
        raise ConfigError(
            "parallelism.data_parallel_shard_degree",
            "is 1 with data_parallel_replicate_degree > 1 (pure DDP), which torchtitan 0.2.2 "
            "mis-scales; use FSDP (data_parallel_replicate_degree = 1) or HSDP (shard degree >= 2)",
        )
    if ep > 1:
        if not expert_counts:
            raise ConfigError("parallelism.expert_parallel_degree", f"is {ep} but [moe] is not enabled; set it to 1")
        if dp_shard % ep:
            raise ConfigError(
                "parallelism.expert_parallel_degree",
                f"{ep} must divide data_parallel_shard_degree {dp_shard}: expert-parallel ranks are "
                f"borrowed from the FSDP dimension (dp2ep)",
            )
        for i, n in enumerate(expert_counts):
            if n % ep:
                raise ConfigError(
                    f"moe.expert_sets[{i}].num_experts",
                    f"{n} experts cannot be split evenly over expert_parallel_degree {ep}; "
                    f"use a multiple of {ep} or change the EP degree",
                )
    return Mesh(world_size=world_size, dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep)


def check_checkpoint(checkpoint: Any) -> None:
    """``[checkpoint]``: the manager's own rules (``titan_moe.checkpoint.settings``), before launch."""
    from titan_moe.checkpoint.settings import check_checkpoint_config

    check_checkpoint_config(checkpoint)


def check_profiling(profiling: Any) -> None:
    """``[profiling]``: torchtitan asserts these only after the process group is up
    (``profile_freq - (warmup + active)`` becomes the profiler schedule's ``wait``)."""
    if not (profiling.enable_profiling or profiling.enable_memory_snapshot):
        return
    if profiling.profile_freq < 1:
        raise ConfigError("profiling.profile_freq", f"is {profiling.profile_freq}; profile every N >= 1 steps")
    if not profiling.enable_profiling:
        return
    if profiling.profiler_active < 1:
        raise ConfigError("profiling.profiler_active", f"is {profiling.profiler_active}; trace at least 1 step")
    if profiling.profiler_warmup < 0:
        raise ConfigError("profiling.profiler_warmup", f"is {profiling.profiler_warmup}; use 0 or more steps")
    cycle = profiling.profiler_warmup + profiling.profiler_active
    if profiling.profile_freq < cycle:
        raise ConfigError(
            "profiling.profile_freq",
            f"is {profiling.profile_freq}, shorter than profiler_warmup {profiling.profiler_warmup} + "
            f"profiler_active {profiling.profiler_active} = {cycle}; use profile_freq >= {cycle}",
        )


def check_batch(training: Any, mesh: Mesh) -> None:
    if training.local_batch_size < 1:
        raise ConfigError("training.local_batch_size", f"must be >= 1, got {training.local_batch_size}")
    gbs = training.global_batch_size
    per_step = training.local_batch_size * mesh.dp
    if gbs > 0 and gbs % per_step:
        raise ConfigError(
            "training.global_batch_size",
            f"{gbs} is not a multiple of local_batch_size {training.local_batch_size} x "
            f"data-parallel degree {mesh.dp} = {per_step}",
        )


@dataclass(frozen=True)
class RunPlan:
    """A run config planned once per process: what every builder after preflight reuses.

    The launcher plans once (before torchrun starts), each rank plans once (before
    ``init_process_group``); torchtitan's model-args hook and the data builders then
    read this plan from the run config instead of re-deriving it (``plan_run``
    attaches it as ``job_config.run_plan``, and ``[data]``'s part as
    ``job_config.data_plan``, see ``titan_moe.data.setup``).
    """

    model_args: TitanMoEModelArgs
    mesh: Mesh
    data: Any = None
    """``titan_moe.data.setup.DataPlan`` of an ``mds`` run whose manifests were read; else None."""


RUN_PLAN_ATTRIBUTE = "run_plan"


def plan_run(job_config: Any, world_size: int, *, read_data: bool = True) -> RunPlan:
    """Everything that can be known wrong before ``init_process_group``, planned once.

    ``read_data = False`` skips reading the ``[data]`` manifests (the Kubernetes renderer
    checks a run on a machine that may not reach the cluster's object store).
    """
    if job_config.model.name != MODEL_NAME:
        raise ConfigError("model.name", f"titan-moe trains model.name = {MODEL_NAME!r}, got {job_config.model.name!r}")
    args = model_args_from_config(job_config)
    counts = [s.num_experts for s in args.moe.expert_sets] if args.moe.enabled else []
    mesh = check_mesh(job_config.parallelism, world_size, counts)
    check_batch(job_config.training, mesh)
    check_checkpoint(job_config.checkpoint)
    check_profiling(job_config.profiling)
    job_config.eval.validate()
    data = check_dataset(job_config, read_data=read_data)
    plan = RunPlan(model_args=args, mesh=mesh, data=data)
    setattr(job_config, RUN_PLAN_ATTRIBUTE, plan)
    return plan


def planned_model_args(job_config: Any) -> TitanMoEModelArgs:
    """The model args ``plan_run`` attached to this run config, or freshly built ones."""
    plan = getattr(job_config, RUN_PLAN_ATTRIBUTE, None)
    return plan.model_args if plan is not None else model_args_from_config(job_config)


def check_dataset(job_config: Any, *, read_data: bool = True) -> Any:
    """``training.dataset`` is one titan-moe trains on; ``mds`` checks ``[data]`` against its manifests.

    The reader already turned an unset dataset into ``mds`` when ``[data].root`` is set.
    Returns the ``DataPlan`` when the manifests were read, else None.
    """
    dataset = job_config.training.dataset
    choices = " or ".join(repr(d) for d in DATASETS)
    if not dataset:
        raise ConfigError("training.dataset", f"is not set; choose {choices} (or set [data].root, which implies 'mds')")
    if dataset not in DATASETS:
        raise ConfigError("training.dataset", f"unknown dataset {dataset!r}; use {choices}")
    if dataset != "mds":
        return None
    job_config.data.check()
    if not read_data:
        return None
    # Imported on use: the loader pulls in MosaicML streaming, which synthetic runs,
    # describe and the k8s renderer do not need.
    from titan_moe.data.setup import plan_data

    return plan_data(job_config)

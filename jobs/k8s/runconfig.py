"""What the Kubernetes renderer needs to know about one run config.

A config that renders must be a config that starts: the renderer parses the
TOML and its overrides with the trainer's own reader
(``titan_moe.run_config.job_config.load_run_config``) and runs the trainer's preflight
(``titan_moe.run_config.preflight.plan_run``: model design point, device mesh, batch,
``[data]`` settings) for the cluster's world size ``nodes x gpus_per_node``.
So a mesh that does not tile the cluster fails at render time, not after N
nodes were scheduled and rendezvoused.  The data manifests are not read: the
machine that renders may not reach the cluster's object store.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan_moe.common.errors import ConfigError

# A ConfigMap, like any object, must stay under etcd's ~1.5 MiB request limit;
# keep clear of it.
MAX_CONFIGMAP_BYTES = 1024 * 1024
# Fields whose check depends on the world size: only their errors can be fixed by
# another --nodes / --gpus-per-node (a bad dataset or model field cannot).
_SHAPE_FIELDS = re.compile(
    r"^(parallelism\.(data_parallel_shard_degree|data_parallel_replicate_degree|expert_parallel_degree)"
    r"|moe\.expert_sets\[\d+\]\.num_experts|training\.global_batch_size)$"
)


@dataclass(frozen=True)
class ClusterRunConfig:
    """One run TOML and its overrides, checked for a cluster's world size.

    ``text`` ships verbatim in a ConfigMap and ``overrides`` follow it on the
    trainer's and the eval Job's command lines; the folders are relative to
    ``[job].dump_folder``, which the renderer points at the shared volume.
    """

    path: Path
    text: str
    checkpoint_folder: str
    tb_folder: str
    mesh: Any  # titan_moe.run_config.preflight.Mesh
    job: Any  # the parsed run config (titan_moe.run_config.job_config.load_run_config)
    overrides: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _relative_folder(value: str, field: str, default: str) -> str:
    """torchtitan joins ``os.path.join(dump_folder, folder)``: an absolute or URL
    folder would silently escape the run's folder on the shared volume."""
    if not value or value.startswith("/") or "://" in value or ".." in Path(value).parts:
        raise ConfigError(
            field,
            f"{value!r} must be a folder relative to [job].dump_folder for a cluster run "
            f"(the renderer points dump_folder at the shared run volume); use e.g. {default!r}",
        )
    return value


def check_run_config(path: str | Path, nodes: int, gpus_per_node: int,
                     overrides: list[str] | tuple[str, ...] = ()) -> ClusterRunConfig:
    """Read and check ``path`` (+ overrides) for ``nodes x gpus_per_node`` ranks; ConfigError if it cannot run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("RUN.toml", f"run config {str(path)!r} does not exist or is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("RUN.toml", f"{path} is not valid TOML: {exc}") from None
    if len(text.encode()) > MAX_CONFIGMAP_BYTES:
        raise ConfigError("RUN.toml", f"{path} is {len(text.encode())} bytes; a ConfigMap holds at most 1 MiB")

    # Imported here: it pulls in torch/torchtitan, which `--help` should not pay for.
    from titan_moe.run_config.job_config import load_run_config
    from titan_moe.run_config.preflight import plan_run

    try:
        job_config = load_run_config(path, overrides)
    except ConfigError as exc:
        raise ConfigError("RUN.toml", f"{path} does not parse as a run config: {exc}") from None
    world = nodes * gpus_per_node
    try:
        mesh = plan_run(job_config, world, read_data=False).mesh
    except ConfigError as exc:
        if not _SHAPE_FIELDS.match(exc.field):
            raise ConfigError(exc.field, f"{str(exc).removeprefix(f'{exc.field}: ')} (in {path})") from None
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise ConfigError(
            exc.field,
            f"{message} (cluster: --nodes {nodes} x --gpus-per-node {gpus_per_node} = {world} ranks; "
            f"change the run config or the cluster shape)",
        ) from None

    return ClusterRunConfig(
        path=path,
        text=text,
        job=job_config,
        overrides=tuple(overrides),
        checkpoint_folder=_relative_folder(job_config.checkpoint.folder, "checkpoint.folder", "checkpoint"),
        tb_folder=_relative_folder(job_config.metrics.save_tb_folder, "metrics.save_tb_folder", "tb"),
        mesh=mesh,
    )


def check_eval_inputs(config: ClusterRunConfig, eval_tasks: str) -> None:
    """Refuse a run whose eval Job could not find its tokenizer or would not know its tasks.

    The eval Job resolves the tokenizer from the run config alone
    (``titan_moe.data.run_tokenizer``): ``[model].hf_assets_path/tokenizer.json``,
    the copy the trainer keeps in the checkpoint folder, or
    ``[data].root/tokenizer.json`` written by ``titan-moe prep``.  Only the last
    two are known to exist on a cluster: a relative ``hf_assets_path`` (the
    shipped configs say ``"."``) is relative to the image's working directory,
    which holds no tokenizer.  Nothing is read here (the rendering machine may
    not reach the store); what is checked is that the run names a place where
    a tokenizer will be.
    """
    from eval.tasks import parse_tasks

    try:
        parse_tasks(eval_tasks)
    except ConfigError as exc:
        raise ConfigError("--eval-tasks", str(exc).removeprefix(f"{exc.field}: ")) from None
    job = config.job
    assets = job.model.hf_assets_path or ""
    if assets.startswith("/") or "://" in assets:
        return  # named by the user: in the image, on the run volume or in the store
    data = job.data
    if job.training.dataset == "mds" and data.root and data.format == "titan-moe":
        return  # prep wrote [data].root/tokenizer.json; the trainer copies it next to the checkpoints
    why = (f"[data].format = {data.format!r} folders carry no tokenizer.json" if job.training.dataset == "mds"
           else f"training.dataset = {job.training.dataset!r} has no tokenizer")
    raise ConfigError(
        "model.hf_assets_path",
        f"the eval Job of {config.path} could not find a tokenizer ({why}, and hf_assets_path = {assets!r} is "
        "not an absolute path or URL). Train on data written by `titan-moe prep` ([data].root = its OUTPUT_URL; "
        "prep writes tokenizer.json next to manifest.json), or set [model].hf_assets_path to an absolute folder "
        "or URL that holds tokenizer.json on the cluster",
    )

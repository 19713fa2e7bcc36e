"""Render the Kubernetes manifests of one run config into a directory.

``render_run`` is the library entry point (the sweep renders many runs with
it); ``titan-moe k8s render`` is its command line (``jobs/k8s/cli.py``).
Every input is checked before a single file is written, and each file is
written to a temporary name and renamed, so a failed render leaves the output
directory as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from jobs.k8s import manifests
from jobs.k8s.manifests import Run
from jobs.k8s.options import RenderOptions, check_image, check_queue, check_shape, name_from_stem
from jobs.k8s.runconfig import check_eval_inputs, check_run_config

# What `kubectl apply -k DIR` creates while training; the eval Job is applied
# by hand after the run finished (it would otherwise score a half-trained model).
KUSTOMIZE_FILES = ("configmap.yaml", "jobset.yaml", "tensorboard-deployment.yaml", "tensorboard-service.yaml")
EVAL_FILE = "eval-job.yaml"


def plan_run(
    config_path: str | Path,
    nodes: int,
    gpus_per_node: int,
    image: str | None,
    queue: str | None = None,
    options: RenderOptions | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Run:
    """Check every input and resolve the mesh; raise ConfigError naming the bad field."""
    options = options or RenderOptions()
    nodes, gpus_per_node = check_shape(nodes, gpus_per_node)
    image = check_image(image)
    options.check(nodes)
    options.check_shape(gpus_per_node)
    check_queue(queue)
    config = check_run_config(config_path, nodes, gpus_per_node, overrides)
    check_eval_inputs(config, options.eval_tasks)  # the eval Job must work too, not fail after training
    name = options.name or name_from_stem(Path(config_path).stem, nodes)
    return Run(name, config, nodes, gpus_per_node, image, queue, options)


def build_manifests(run: Run) -> dict[str, dict]:
    """File name -> object, for every file the render writes (kustomization included)."""
    objects = {
        "configmap.yaml": manifests.configmap(run),
        "jobset.yaml": manifests.jobset(run),
        "tensorboard-deployment.yaml": manifests.tensorboard_deployment(run),
        "tensorboard-service.yaml": manifests.tensorboard_service(run),
        EVAL_FILE: manifests.eval_job(run),
    }
    kustomization: dict = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(KUSTOMIZE_FILES),
    }
    kustomization["namespace"] = run.options.namespace
    objects["kustomization.yaml"] = kustomization
    return objects


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with multi-line strings (the run TOML, the shell command) kept readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def to_yaml(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_objects(objects: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """Write ``file name -> object`` as YAML into ``out_dir``, each file atomically."""
    texts = {name: to_yaml(obj) for name, obj in objects.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        _write_atomic(out / name, text)
        written.append(out / name)
    return written


def render_run(
    config_path: str | Path,
    nodes: int,
    gpus_per_node: int,
    image: str | None,
    out_dir: str | Path,
    queue: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **options,
) -> list[Path]:
    """Write the manifests of one run into ``out_dir``; return the written paths.

    ``options`` are ``RenderOptions`` fields (``name``, ``namespace``,
    ``runs_claim``, ``checkpoint_seconds``, ``network``, ...); ``overrides`` are
    run-config ``--section.key value`` pairs, checked here and passed to the
    trainer.  Raises ``titan_moe.common.errors.ConfigError`` naming the field for a run
    that cannot work (a mesh that does not tile ``nodes x gpus_per_node``, a
    missing image, an unknown dataset, ...) before writing anything.
    """
    run = plan_run(config_path, nodes, gpus_per_node, image, queue, RenderOptions(**options), overrides)
    return write_objects(build_manifests(run), out_dir)

"""Kubernetes manifests for multi-node titan-moe runs (JobSet + TensorBoard + eval).

``render_run(config_path, nodes, gpus_per_node, image, out_dir, queue=None, **options)``
writes them for one run config; ``titan-moe k8s render`` is its command line.

Imported lazily: ``python -m jobs.k8s.entrypoint`` (PID 1 of a trainer pod) and
``python -m jobs.k8s.worker`` (each trainer process) import this package first,
and the renderer pulls in the trainer's config machinery (torchtitan), which
PID 1 does not need and a worker must import only after the trainer's own
platform setup.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RenderOptions", "render_run"]


def __getattr__(name: str) -> Any:
    if name == "RenderOptions":
        from jobs.k8s.options import RenderOptions

        return RenderOptions
    if name == "render_run":
        from jobs.k8s.render import render_run

        return render_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

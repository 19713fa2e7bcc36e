"""Kubernetes manifests for multi-node titan-moe runs (JobSet + TensorBoard + eval).

``render_run(config_path, nodes, gpus_per_node, image, out_dir, queue=None, **options)``
writes them for one run config; ``titan-moe k8s render`` is its command line.
"""

from jobs.k8s.options import RenderOptions
from jobs.k8s.render import render_run

__all__ = ["RenderOptions", "render_run"]

"""The run configs titan-moe ships, as package data: ``bench`` and ``gpu-check``
read them from an installed wheel as from a checkout (``shipped("tiny_moe")``).

tiny_dense / tiny_moe / tiny_moe_hetero   seconds-long CPU runs (tests, examples)
olmoe_like_small                          a small OLMoE-shaped run
bench_cpu_small / bench_olmoe_1b7b        ``titan-moe bench`` shapes
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(name: str) -> Path:
    """The path of shipped config ``name`` (``"tiny_moe"`` or ``"tiny_moe.toml"``); FileNotFoundError if none."""
    stem = name.removesuffix(".toml")
    # A wheel installs package data as plain files, so the resource is a real path torchtitan can open.
    path = Path(str(resources.files(__name__) / f"{stem}.toml"))
    if not path.is_file():
        known = sorted(p.stem for p in Path(str(resources.files(__name__))).glob("*.toml"))
        raise FileNotFoundError(f"no shipped run config {stem!r}; shipped: {', '.join(known)}")
    return path

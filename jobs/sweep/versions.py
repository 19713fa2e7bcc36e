"""Which torch / torchtitan each sweep point ran on, and whether a sweep mixed them.

A point's versions come from the COMMITTED markers of its checkpoints: the run
itself writes them (rank 0 of the trainer, in the environment that computed the
numbers), not the launcher, which may live in another environment.  A point
resumed under other versions has several; ``sweep collect`` reports each point's
and flags a sweep whose losses are therefore not bit-comparable.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from jobs.sweep.plan import CONFIG_NAME
from titan_moe.common import storage
from titan_moe.checkpoint import catalog
from titan_moe.common.versions import KEYS

COLUMNS = tuple(f"{key}_version" for key in ("torch", "torchtitan"))


def _checkpoint_folder(point_dir: Path) -> str:
    config = point_dir / CONFIG_NAME
    folder = "checkpoint"
    if config.is_file():
        folder = tomllib.loads(config.read_text()).get("checkpoint", {}).get("folder", folder)
    return folder if storage.is_url(folder) else str(point_dir / folder)


def point_versions(point_dir: Path) -> dict[str, str]:
    """``torch_version`` / ``torchtitan_version`` of a point's checkpoints ("a; b" when a resume changed them)."""
    if not point_dir.is_dir():
        return {}
    seen: dict[str, list[str]] = {key: [] for key in KEYS}
    for info in catalog.list_checkpoints(_checkpoint_folder(point_dir)):
        for key, version in info.versions.items():
            if key in seen and version not in seen[key]:
                seen[key].append(version)
    return {f"{key}_version": "; ".join(seen[key]) for key in ("torch", "torchtitan") if seen[key]}


def mixed_versions(rows: list[dict[str, Any]]) -> str | None:
    """Why the sweep's results are not bit-comparable (points on different versions), or None."""
    problems = []
    for column in COLUMNS:
        by_version: dict[str, list[str]] = {}
        for row in rows:
            # A point resumed under another version lists both ("a; b"): it counts under each.
            for version in filter(None, str(row.get(column) or "").split("; ")):
                by_version.setdefault(version, []).append(row["name"])
        if len(by_version) > 1:
            parts = [f"{version} ({len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                     for version, names in sorted(by_version.items())]
            problems.append(f"{column.removesuffix('_version')} " + " vs ".join(parts))
    if not problems:
        return None
    return ("points ran on different versions -- " + "; ".join(problems)
            + ": their losses are not bit-comparable (another torch draws other initial weights from the same seed)")

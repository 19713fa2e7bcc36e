"""Reading a sweep spec file: ``extends`` chains, ``--set`` overrides, then the checks.

``jobs.sweep.spec`` declares the typed spec, ``jobs.sweep.spec_check`` turns a
merged document into it, and this module turns a file (plus overrides) into
that document; data flows file -> document -> ``SweepSpec`` one way.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from jobs.sweep.spec import SweepSpec
from jobs.sweep.spec_check import parse_spec
from titan_moe.errors import ConfigError


# --------------------------------------------------------------------------- loading
def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read, merge (``extends``), override (``key.path=value``) and validate a spec file."""
    doc = _load_with_extends(Path(path), [])
    for item in overrides or []:
        apply_override(doc, item)
    return parse_spec(doc)


def _load_with_extends(path: Path, chain: list[Path]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in [*chain, path])
        raise ConfigError("spec.extends", f"circular extends chain: {cycle}")
    if not path.is_file():
        where = f" (extended by {chain[-1].name})" if chain else ""
        raise ConfigError("spec", f"spec file {str(path)!r} does not exist{where}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("spec", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError("spec", f"{path} must hold a mapping at the top level, got {type(doc).__name__}")
    parent = doc.pop("extends", None)
    if parent is None:
        return doc
    if not isinstance(parent, str):
        raise ConfigError("spec.extends", f"must be a file name relative to {path.name}, got {parent!r}")
    return deep_merge(_load_with_extends(path.parent / parent, [*chain, path]), doc)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, everything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(doc: dict[str, Any], item: str) -> None:
    """``cluster.ep_degree=4`` or ``run.data.root=/tmp/mds``: the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"{item!r} is not KEY.PATH=VALUE (e.g. cluster.ep_degree=4)")
    parts = key.strip().split(".")
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}", f"spec.{'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""

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

from jobs.sweep.spec import NAME_PATTERN, StudyPart, StudySpec, SweepSpec
from jobs.sweep.spec_check import parse_spec
from titan_moe.common.errors import ConfigError


# --------------------------------------------------------------------------- loading
def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec | StudySpec:
    """Read, merge (``extends``), override (``key.path=value``) and validate a spec file.

    A study file (``parts:``) gives a ``StudySpec``: each part is loaded the same way,
    its ``set:`` values applied first, then ``overrides`` (which apply to every part)."""
    doc = _load_with_extends(Path(path), [])
    if "parts" in doc:
        return _load_study(Path(path), doc, overrides or [])
    for item in overrides or []:
        apply_override(doc, item)
    return parse_spec(doc)


def _load_study(path: Path, doc: dict[str, Any], overrides: list[str]) -> StudySpec:
    unknown = set(doc) - {"name", "description", "parts"}
    if unknown:
        raise ConfigError(f"spec.{sorted(unknown)[0]}", "a study file (parts:) holds only name, description and "
                          "parts; put settings in the part specs or a part's set:")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError("spec.name", f"must be a lowercase name like 'full_study', got {name!r}")
    raw_parts = doc["parts"]
    if not isinstance(raw_parts, list) or not raw_parts:
        raise ConfigError("spec.parts", "must list parts like {spec: main_grid.yaml, tier: 1}")
    parts = []
    for i, raw in enumerate(raw_parts):
        where = f"spec.parts[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("spec"), str):
            raise ConfigError(f"{where}.spec", f"must name a spec file beside {path.name}, got {raw!r}")
        extra = set(raw) - {"spec", "tier", "set"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}", "unknown key; valid keys: set, spec, tier")
        tier = raw.get("tier")
        if isinstance(tier, bool) or not isinstance(tier, int) or tier < 1:
            raise ConfigError(f"{where}.tier", f"must be an integer >= 1, got {tier!r}")
        sets = raw.get("set") or {}
        if not isinstance(sets, dict):
            raise ConfigError(f"{where}.set", "must map KEY.PATH to a value, like {moe.sparsities: [8]}")
        part_doc = _load_with_extends(path.parent / raw["spec"], [path.resolve()])
        try:
            for key, value in sets.items():
                set_path(part_doc, str(key), value)
            for item in overrides:
                apply_override(part_doc, item)
            spec = parse_spec(part_doc)
        except ConfigError as exc:
            raise ConfigError(f"{where} ({raw['spec']}): {exc.field}", str(exc).split(": ", 1)[-1]) from None
        spec.tier = tier
        parts.append(StudyPart(spec, tier, raw["spec"]))
    return StudySpec(name, parts, str(doc.get("description", "")), raw=doc)


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
    set_path(doc, key.strip(), yaml.safe_load(text) if text.strip() else "", where=f"--set {key.strip()}")


def set_path(doc: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """Set ``doc[a][b][c] = value`` for ``key = "a.b.c"``; ``axes.moe.x`` keeps the dotted axis
    path whole (an axis key is a run-config path, not nested mappings)."""
    parts = key.split(".")
    if parts[0] == "axes" and len(parts) > 2:
        parts = ["axes", ".".join(parts[1:])]
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(where or f"set {key}", f"spec.{'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = copy.deepcopy(value)

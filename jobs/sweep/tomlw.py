"""A small TOML writer for run configs (the standard library only reads TOML).

Top-level mappings become ``[section]`` tables, mappings nested in them become
``[section.sub]`` tables unless they hold only plain values (then an inline
table, like ``repeat = {dclm = 4.0}``); lists of mappings become lists of inline
tables (``expert_sets = [{...}, {...}]``).  ``None`` means "not set" and is left
out: TOML has no null, and torchtitan then keeps its default.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} cannot be written to a run config")
        return repr(value)  # shortest round-tripping form, e.g. 0.0003 -> 0.0003, 1e-05
    if isinstance(value, str):
        # JSON string escapes (\" \\ \n \uXXXX) are valid TOML basic-string escapes.
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, f"{where}[{i}]") for i, v in enumerate(value) if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_key(k)} = {_value(v, f'{where}.{k}')}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"{where}: cannot write {type(value).__name__} {value!r} as TOML")


def _is_table(value: Any) -> bool:
    """A nested mapping that holds mappings itself gets its own ``[a.b]`` header."""
    return isinstance(value, dict) and any(isinstance(v, dict) for v in value.values())


def _emit_table(lines: list[str], name: str, table: dict[str, Any]) -> None:
    lines.append(f"[{name}]")
    subtables = []
    for key, value in table.items():
        if value is None:
            continue
        if _is_table(value):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value, f'{name}.{key}')}")
    lines.append("")
    for key, value in subtables:
        _emit_table(lines, f"{name}.{_key(key)}", value)


def dumps(doc: dict[str, dict[str, Any]], header: str = "") -> str:
    """``{section: {key: value}}`` -> TOML text; ``header`` lines become ``#`` comments on top."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise TypeError(f"top-level {name!r} must be a table, got {table!r}")
        _emit_table(lines, _key(name), table)
    return "\n".join(lines).rstrip("\n") + "\n"

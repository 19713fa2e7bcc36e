"""Byte sizes as people write them (``"64mb"``, ``"200gb"``), read in one place.

Binary units (kb = 1024 B), the way MosaicML spells shard sizes; used by prep's
``--shard-size``/``--group-size`` and the trainer's ``[data].cache_limit``.
"""

from __future__ import annotations

import re

from titan_moe.common.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def parse_bytes(text: int | str, field_name: str) -> int:
    """``"200gb"`` -> bytes; an int passes through.  ConfigError naming ``field_name`` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*", str(text).lower())
    if not match:
        raise ConfigError(field_name, f"{text!r} is not a size; write e.g. \"64mb\", \"512kb\" or \"1gb\"")
    return int(float(match.group(1)) * _UNITS[match.group(2)])

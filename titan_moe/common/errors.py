"""Errors a researcher is meant to read.

Every invalid input should surface as one of these with a message that names
the offending field (``moe.expert_sets[0].granularity``) and says how to fix
it, before any process group or file is touched.
"""


class ConfigError(ValueError):
    """A run config, sweep spec or CLI flag that cannot describe a valid run."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")

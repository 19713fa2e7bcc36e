"""Run configs: the schema and the one reader (job_config), overrides, and the pre-launch plan (preflight)."""

"""Benchmarks: scripts that print a ratio against a baseline measured in the same run, repeated and interleaved,
as a median with its interval (``titan_moe.common.bench_stats``)."""

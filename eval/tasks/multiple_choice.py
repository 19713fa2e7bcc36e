"""The shape shared by BoolQ, HellaSwag and MMLU: pick one of several continuations.

A task turns a raw record into a `Question` (prompt, continuations, gold
index).  Few-shot prompts put solved examples before the prompt:
`header + (shot prompt + shot gold continuation + "\\n\\n") * k + prompt`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from eval.tasks.records import BadRecord, LoadReport, open_split
from titan_moe.errors import ConfigError

SHOT_SEPARATOR = "\n\n"
SHOT_SEED = 1234


@dataclass
class Question:
    id: str  # the record's location; stable across runs and ranks
    prompt: str  # context without shots, e.g. "Question: ...\nAnswer:"
    choices: list[str]  # continuations as scored, each with its leading space
    gold: int
    group: str | None = None  # MMLU subject

    @property
    def solved(self) -> str:
        """This question as a worked shot."""
        return self.prompt + self.choices[self.gold]


@dataclass
class TaskData:
    """One group's questions plus the pool its few-shot examples come from."""

    questions: list[Question]
    shots: list[Question]
    shots_from_eval_split: bool  # no train/dev copy: shots drawn from the eval split, never the question itself
    report: LoadReport = field(default_factory=LoadReport)


class MultipleChoiceTask:
    """Defaults shared by the downstream tasks; subclasses implement `parse`."""

    name: str = ""
    hub_ids: tuple[tuple[str, str | None], ...] = ()
    eval_split: str = "validation"
    shot_split: str | None = "train"
    primary_metric: str = "accuracy"

    def parse(self, record: dict, location: str, group: str | None) -> Question:
        raise NotImplementedError

    def header(self, group: str | None) -> str:
        return ""

    def groups(self, subsets: list[str] | None) -> list[str | None]:
        if subsets:
            raise ConfigError("--tasks", f"{self.name} has no subsets (got {self.name}:{'+'.join(subsets)})")
        return [None]

    def hub_ids_for(self, group: str | None) -> list[tuple[str, str | None]]:
        return list(self.hub_ids)

    # -- loading ---------------------------------------------------------------
    def load_split(
        self, split: str, group: str | None, data_root: Path | None, override: Path | None, allow_hub: bool | None
    ) -> tuple[list[Question], LoadReport]:
        where, records = open_split(self.name, split, self.hub_ids_for(group), data_root, override, allow_hub)
        return self.parse_all(records, where, group)

    def parse_all(self, records, where: str, group: str | None) -> tuple[list[Question], LoadReport]:
        report = LoadReport(sources=[where])
        questions: list[Question] = []
        for location, record, error in records:
            report.read += 1
            if error is not None:
                report.skip(location, error)
                continue
            try:
                questions.append(self.parse(record, location, group))
            except BadRecord as exc:
                report.skip(location, str(exc))
        return questions, report

    def load(
        self,
        group: str | None,
        *,
        data_root: Path | None,
        override: Path | None = None,
        split: str | None = None,
        need_shots: bool = False,
        allow_hub: bool | None = None,
        limit: int | None = None,
    ) -> TaskData:
        questions, report = self.load_split(split or self.eval_split, group, data_root, override, allow_hub)
        if limit is not None:
            questions = questions[:limit]
        shots, from_eval = [], False
        if need_shots:
            shots, from_eval = self._load_shots(group, data_root, allow_hub, questions)
        return TaskData(questions, shots, from_eval, report)

    def _load_shots(self, group, data_root, allow_hub, questions) -> tuple[list[Question], bool]:
        if self.shot_split is not None:
            try:
                shots, _ = self.load_split(self.shot_split, group, data_root, None, allow_hub)
                if shots:
                    return shots, False
            except Exception:
                pass
        return questions, True

    # -- prompts -----------------------------------------------------------------
    def shots_for(self, data: TaskData, index: int, k: int) -> list[Question]:
        """k solved examples for question `index`.

        Tasks with an ordered dev split (MMLU) take its first k, as the
        original MMLU evaluation does.  Otherwise k are drawn with a seed
        fixed per question (so every rank and every run agrees), excluding
        the question itself when the pool is the eval split.
        """
        if k == 0:
            return []
        pool = data.shots
        if self.shot_split == "dev" and not data.shots_from_eval_split:
            return pool[:k]
        rng = random.Random(SHOT_SEED * 100003 + index)
        picks = rng.sample(range(len(pool)), min(len(pool), k + 1))
        if data.shots_from_eval_split:
            picks = [p for p in picks if p != index]
        return [pool[p] for p in picks[:k]]

    def context(self, question: Question, shots: list[Question]) -> str:
        if not shots:
            return question.prompt
        body = "".join(s.solved + SHOT_SEPARATOR for s in shots)
        return self.header(question.group) + body + question.prompt

"""HellaSwag (Zellers et al. 2019): pick the plausible ending of an activity.

Text cleaning and prompt follow lm-evaluation-harness: the context is
`clean(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`, each
ending `" " + clean(ending)`.  Headline metric: per-character length-
normalised accuracy (endings differ a lot in length).
"""

from __future__ import annotations

import re

from eval.tasks.multiple_choice import MultipleChoiceTask, Question
from eval.tasks.records import BadRecord, require


def clean(text: str) -> str:
    """WikiHow artefacts: " [title]" marks a sentence break, other [..] tags are noise."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    hub_ids = (("Rowan/hellaswag", None), ("hellaswag", None))
    eval_split = "validation"
    shot_split = "train"
    primary_metric = "accuracy_per_char"

    def parse(self, record: dict, location: str, group: str | None) -> Question:
        activity = require(record, "activity_label", str)
        ctx_a = require(record, "ctx_a", str)
        ctx_b = require(record, "ctx_b", str)
        endings = require(record, "endings", list)
        if len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise BadRecord("endings", f"expected a list of >= 2 strings, got {endings!r:.60}")
        label = require(record, "label", (str, int))
        try:
            gold = int(label)
        except ValueError:
            raise BadRecord("label", f"expected '0'..'{len(endings) - 1}', got {label!r}") from None
        if not 0 <= gold < len(endings):
            raise BadRecord("label", f"{gold} is not an index into {len(endings)} endings")
        prompt = clean(activity + ": " + ctx_a + " " + ctx_b.capitalize())
        return Question(location, prompt, [" " + clean(e) for e in endings], gold)


TASK = HellaSwag()

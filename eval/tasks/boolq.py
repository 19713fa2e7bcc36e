"""BoolQ (Clark et al. 2019): yes/no questions about a Wikipedia passage.

Prompt `"{passage}\\nQuestion: {question}?\\nAnswer:"`, continuations
`" yes"` / `" no"` (lm-evaluation-harness' and OLMo's form); metric accuracy.
"""

from __future__ import annotations

from eval.tasks.multiple_choice import MultipleChoiceTask, Question
from eval.tasks.records import BadRecord, require


class BoolQ(MultipleChoiceTask):
    name = "boolq"
    hub_ids = (("google/boolq", None), ("boolq", None), ("super_glue", "boolq"))
    eval_split = "validation"
    shot_split = "train"
    primary_metric = "accuracy"

    def parse(self, record: dict, location: str, group: str | None) -> Question:
        passage = require(record, "passage", str)
        question = require(record, "question", str)
        if "label" in record and "answer" not in record:  # super_glue's form: label 0/1
            label = require(record, "label", int)
            if label not in (0, 1):
                raise BadRecord("label", f"expected 0 or 1, got {label}")
            answer = bool(label)
        else:
            answer = require(record, "answer", bool)
        prompt = f"{passage}\nQuestion: {question}?\nAnswer:"
        return Question(location, prompt, [" yes", " no"], 0 if answer else 1)


TASK = BoolQ()

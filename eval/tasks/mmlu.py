"""MMLU (Hendrycks et al. 2021): 57 subjects of four-way multiple choice.

Two prompt forms (REFERENCE.md):
- cloze (default, what small models are compared on): `"Question: {q}\\nAnswer:"`
  scored against each `" " + choice`;
- mc (lm-evaluation-harness' form): the question, `"A. .."` .. `"D. .."` lines, `"Answer:"`,
  scored against `" A"` .. `" D"`.
5-shot puts `"The following are multiple choice questions (with answers) about
{subject}.\\n\\n"` and the subject's first five dev examples before the prompt.

Categories use OLMo's copy of the original Hendrycks mapping (anatomy in
"other"; lm-evaluation-harness files it under "stem").  Category and overall
scores are question-weighted (micro) averages.
"""

from __future__ import annotations

from pathlib import Path

from eval.tasks.multiple_choice import MultipleChoiceTask, Question
from eval.tasks.records import BadRecord, LoadReport, open_split, require
from titan_moe.errors import ConfigError

CATEGORIES: dict[str, list[str]] = {
    "stem": [
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics",
        "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ],
    "humanities": [
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence",
        "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ],
    "social_sciences": [
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations",
        "security_studies", "sociology", "us_foreign_policy",
    ],
    "other": [
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine",
        "global_facts", "human_aging", "management", "marketing", "medical_genetics",
        "miscellaneous", "nutrition", "professional_accounting", "professional_medicine",
        "virology",
    ],
}  # fmt: skip
CATEGORY_OF = {subject: cat for cat, subjects in CATEGORIES.items() for subject in subjects}
SUBJECTS = sorted(CATEGORY_OF)
LETTERS = "ABCD"


class MMLU(MultipleChoiceTask):
    name = "mmlu"
    eval_split = "validation"
    shot_split = "dev"
    primary_metric = "accuracy"

    def __init__(self, prompt_format: str = "cloze"):
        if prompt_format not in ("cloze", "mc"):
            raise ValueError(f"MMLU prompt format must be 'cloze' or 'mc', got {prompt_format!r}")
        self.prompt_format = prompt_format
        self._shared: dict[tuple[str, str], tuple[list[Question], LoadReport]] = {}

    def groups(self, subsets: list[str] | None) -> list[str | None]:
        """Subjects to load: all 57, or named subjects and/or whole categories."""
        if not subsets:
            return list(SUBJECTS)
        chosen: list[str] = []
        for name in subsets:
            if name in CATEGORIES:
                chosen += CATEGORIES[name]
            elif name in CATEGORY_OF:
                chosen.append(name)
            else:
                raise ConfigError(
                    "--tasks mmlu:<subset>",
                    f"unknown subject or category {name!r}; categories: {', '.join(CATEGORIES)}; "
                    f"subjects: {', '.join(SUBJECTS)}",
                )
        return sorted(set(chosen), key=chosen.index)

    def hub_ids_for(self, group: str | None) -> list[tuple[str, str | None]]:
        return [("hails/mmlu_no_train", group), ("cais/mmlu", group)]

    def load_split(self, split, group, data_root, override, allow_hub):
        where, records = open_split(self.name, split, self.hub_ids_for(group), data_root, override, allow_hub)
        per_subject = group is not None and (group in Path(where).parts or f"/{group}:" in where)
        if per_subject:  # hails/mmlu_no_train/<subject>/<split>, or the hub config <subject>
            return self.parse_all(records, where, group)
        # One file for all subjects (`mmlu/<split>.jsonl`, --task-data): parse it once, with the
        # subject taken from each record, and report its bad lines once, not once per subject.
        key = (split, where)
        first = key not in self._shared
        if first:
            self._shared[key] = self.parse_all(records, where, None)
        questions, report = self._shared[key]
        return [q for q in questions if q.group == group], report if first else LoadReport(sources=[where])

    def parse(self, record: dict, location: str, group: str | None) -> Question:
        question = require(record, "question", str)
        choices = require(record, "choices", list)
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise BadRecord("choices", f"expected 4 strings, got {choices!r:.80}")
        answer = record.get("answer")
        if isinstance(answer, str) and answer in LETTERS:  # some copies store the letter
            answer = LETTERS.index(answer)
        answer = require({"answer": answer}, "answer", int)
        if not 0 <= answer < 4:
            raise BadRecord("answer", f"expected 0..3, got {answer}")
        subject = record.get("subject") or group
        if subject is None:
            raise BadRecord("subject", "missing (a file holding several subjects needs it on every record)")
        if subject not in CATEGORY_OF:
            raise BadRecord("subject", f"unknown MMLU subject {subject!r}")
        if self.prompt_format == "cloze":
            prompt = f"Question: {question.strip()}\nAnswer:"
            continuations = [" " + c for c in choices]
        else:  # lm-evaluation-harness' MC form
            lines = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices))
            prompt = f"{question.strip()}{lines}\nAnswer:"
            continuations = [" " + letter for letter in LETTERS]
        return Question(location, prompt, continuations, answer, group=subject)

    def header(self, group: str | None) -> str:
        subject = (group or "").replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


TASK = MMLU()

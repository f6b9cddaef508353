"""What a good answer is, from the `task` params: its format, its fields and their labels.

A task declares `answer_regex` (named groups are the fields), `labels` (allowed values per field),
`stratify_by` (fields whose values stratify the split) and `metrics` (which of the evaluate
modules in stages/metrics/ score it). A free-text task sets `answer_regex: null`, `labels: {}`
and scores with exact match, ROUGE-L and BLEU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Task:
    name: str
    answer_regex: str | None = None
    labels: dict[str, list[str]] = field(default_factory=dict)
    stratify_by: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    answer_schema: dict | None = None  # a JSON schema answers must satisfy (format adherence)

    @classmethod
    def from_params(cls, params: dict) -> Task:
        t = params["task"]
        return cls(
            name=t["name"],
            answer_regex=t["answer_regex"],
            labels={k: list(v) for k, v in t["labels"].items()},
            stratify_by=list(t["stratify_by"]),
            metrics=list(t["metrics"]),
            answer_schema=t.get("answer_schema"),  # the one optional key of the schema
        )

    def parse(self, answer: str | None) -> dict[str, str] | None:
        """Fields of an answer, or None when it does not match the format."""
        if answer is None:
            return None
        if not self.answer_regex:
            return {}
        match = re.fullmatch(self.answer_regex, answer.strip())
        return match.groupdict() if match else None

    def labels_outside_set(self, fields: dict[str, str]) -> list[str]:
        return [f for f, allowed in self.labels.items() if fields.get(f) not in allowed]

    def follows_format(self, answer: str | None) -> bool:
        fields = self.parse(answer)
        return fields is not None and not self.labels_outside_set(fields)

    def stratum(self, answer: str) -> str:
        """The split's stratum of a valid answer: its stratify_by field values joined."""
        fields = self.parse(answer) or {}
        return "|".join(str(fields.get(f)) for f in self.stratify_by)

"""Format adherence: the answer matches the task's regex and every field holds an allowed label,
or, for a task that declares a JSON schema instead, the answer is JSON valid under it."""

import json
import re

import datasets
import evaluate


class FormatAdherence(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions that follow the answer format of the task.",
            citation="",
            inputs_description="predictions: list of str; answer_regex: str with named groups; "
            "labels: dict field -> allowed values; or answer_schema: a JSON schema",
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, answer_regex=None, labels=None, answer_schema=None):
        labels = labels or {}

        def follows(answer):
            if answer_schema is not None:
                import jsonschema

                try:
                    jsonschema.validate(json.loads(answer), answer_schema)
                except (ValueError, jsonschema.ValidationError):
                    return False
                return True
            match = re.fullmatch(answer_regex, answer.strip())
            if not match:
                return False
            fields = match.groupdict()
            return all(fields.get(name) in allowed for name, allowed in labels.items())

        hits = [follows(p) for p in predictions]
        return {
            "format_adherence": sum(hits) / len(hits) if hits else 0.0,
            "per_example": {"format_adherence": [float(h) for h in hits]},
        }

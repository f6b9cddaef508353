"""Per-field accuracy and macro-F1 of the labels parsed out of answers.

An answer that does not parse counts as wrong for every field (its label is None, which is
never a reference label, so it lowers recall of the true class).
"""

import re

import datasets
import evaluate


def macro_f1(predicted, actual, classes):
    scores = []
    for c in classes:
        tp = sum(p == c and a == c for p, a in zip(predicted, actual))
        fp = sum(p == c and a != c for p, a in zip(predicted, actual))
        fn = sum(p != c and a == c for p, a in zip(predicted, actual))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


class FieldScores(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy and macro-F1 per label field of a structured answer.",
            citation="",
            inputs_description="predictions, references: list of str; answer_regex: str with "
            "named groups; labels: dict field -> allowed values (the classes of macro-F1)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, answer_regex, labels):
        def fields(answer):
            match = re.fullmatch(answer_regex, answer.strip())
            return match.groupdict() if match else {}

        pred = [fields(p) for p in predictions]
        ref = [fields(r) for r in references]
        out, per_example = {}, {}
        for name, classes in labels.items():
            p = [f.get(name) for f in pred]
            a = [f.get(name) for f in ref]
            per_example[f"{name}_accuracy"] = [float(x == y) for x, y in zip(p, a)]
            out[f"{name}_accuracy"] = sum(x == y for x, y in zip(p, a)) / len(a) if a else 0.0
            out[f"{name}_macro_f1"] = macro_f1(p, a, classes)  # corpus-level: no per-example score
        return out | {"per_example": per_example}

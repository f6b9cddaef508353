"""Exact match: the answer equals the reference after trimming surrounding whitespace."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions identical to their reference (trimmed).",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        hits = [p.strip() == r.strip() for p, r in zip(predictions, references)]
        return {
            "exact_match": sum(hits) / len(hits) if hits else 0.0,
            "per_example": {"exact_match": [float(h) for h in hits]},
        }

"""report: the summary holds the per-example metrics evaluate lists; a diverged run's null
metrics are written as such, never a crash."""

from __future__ import annotations

from stages import report


def reports(tuned: dict, per_example: list[str]) -> dict:
    return {
        "metrics": {"tuned": tuned, "per_example": per_example, "forgetting": {"loss_delta": None}},
        "split": {"sizes": {"train": 10, "validation": 2, "test": 3}},
        "validate": {"rows_quarantined": 1},
    }


def test_summary_is_the_metrics_evaluate_scores_per_example():
    tuned = {
        "exact_match": 0.9,
        "test_loss": 0.1,
        "perplexity": 1.1,
        "bleu": 30.0,
        "urgency_macro_f1": 0.8,
    }
    out = report.summary(reports(tuned, ["exact_match", "test_loss"]))
    assert out == {
        "exact_match": 0.9,
        "test_loss": 0.1,
        "forgetting": None,
        "quarantined": 1,
        "train_rows": 10,
        "test_rows": 3,
    }


def test_a_metric_that_was_not_finite_stays_null_and_the_card_says_so():
    out = report.summary(
        reports({"exact_match": 0.5, "test_loss": None}, ["exact_match", "test_loss"])
    )
    assert out["test_loss"] is None
    assert report.number(None) == "n/a (not finite)"
    assert report.number(0.25) == "0.2500" and report.number(-0.5, "+") == "-0.5000"

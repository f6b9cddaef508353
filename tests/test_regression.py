"""regression: runs compare only on the same test set; per-example metrics fail only on a drop
that is both significant (paired bootstrap) and beyond tolerance; the rest on tolerance alone."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from regression import (
    bootstrap_interval,
    compare,
    lock_data_md5,
    not_comparable,  # noqa: E402
    paired_scores,
)

RULES = {
    "tolerance": {"default": 0.02, "test_loss": 0.10, "loss_delta": 0.05},
    "relative": ["test_loss"],
    "lower_is_better": ["test_loss", "loss_delta"],
}


def diff(**changes):
    return {
        "reports/metrics.json": {
            k.replace("__", "."): {"old": o, "new": n} for k, (o, n) in changes.items()
        }
    }


def predictions(hits: list[int], losses: list[float] | None = None) -> list[dict]:
    return [
        {
            "id": f"ex{i}",
            "scores": {
                "tuned": {
                    "exact_match": float(h),
                    "loss_sum": (losses or [1.0] * len(hits))[i],
                    "loss_tokens": 10,
                }
            },
        }
        for i, h in enumerate(hits)
    ]


def verdict(old_hits, new_hits, old_losses=None, new_losses=None) -> dict[str, str]:
    old, new = predictions(old_hits, old_losses), predictions(new_hits, new_losses)
    intervals = {
        name: bootstrap_interval(*cols, 2000, 0.95, seed=0)
        for name, cols in paired_scores(old, new).items()
    }
    mean = lambda hits: sum(hits) / len(hits)  # noqa: E731
    loss = lambda ls: sum(ls or [1.0] * len(old_hits)) / (10 * len(old_hits))  # noqa: E731
    rows = compare(
        diff(
            tuned__exact_match=(mean(old_hits), mean(new_hits)),
            tuned__test_loss=(loss(old_losses), loss(new_losses)),
        ),
        RULES,
        intervals,
    )
    return {r["metric"]: r["status"] for r in rows}


def test_an_unchanged_rerun_passes():
    hits = [1] * 105 + [0] * 13
    assert verdict(hits, hits) == {"tuned.exact_match": "ok", "tuned.test_loss": "ok"}


def test_a_real_regression_fails():
    old = [1] * 105 + [0] * 13  # 0.89
    new = [1] * 70 + [0] * 48  # 0.59: 35 answers lost
    assert verdict(old, new)["tuned.exact_match"] == "REGRESSION"
    losses = [1.0] * 118
    assert verdict(old, old, losses, [1.5] * 118)["tuned.test_loss"] == "REGRESSION"


def test_a_noise_sized_change_passes():
    # 3 of 118 answers flip (0.89 -> 0.86): beyond the 2-point tolerance, but the paired
    # interval reaches 0 (sampling noise on 118 examples is several points)
    old = [1] * 105 + [0] * 13
    new = [0] * 3 + [1] * 102 + [0] * 13
    assert verdict(old, new)["tuned.exact_match"] == "ok (within noise)"


def test_a_small_but_consistent_drop_within_tolerance_passes():
    old = [1] * 1000 + [0] * 1000
    new = [0] * 10 + [1] * 990 + [0] * 1000  # significant (every change is a loss), 0.5 points
    assert verdict(old, new)["tuned.exact_match"] == "ok"


def test_a_changed_test_set_is_not_comparable():
    same = {"test_set": {"examples": 118, "sha256": "a" * 64}}
    assert not_comparable(same, same) is None
    other = {"test_set": {"examples": 168, "sha256": "b" * 64}}
    assert "test set changed: 118 examples" in not_comparable(same, other)
    assert "no test-set hash" in not_comparable({}, same)


def test_examples_pair_by_id_not_position():
    old = predictions([1, 0])
    new = list(reversed(predictions([1, 0])))
    low, high = bootstrap_interval(*paired_scores(old, new)["exact_match"], 500, 0.95, seed=0)
    assert low == high == 0.0


def test_corpus_metrics_fall_back_to_the_tolerance():
    rows = {
        r["metric"]: r["status"]
        for r in compare(
            diff(tuned__urgency_macro_f1=(0.80, 0.79), tuned__bleu=(0.5, 0.4)), RULES, {}
        )
    }
    assert rows == {"tuned.urgency_macro_f1": "ok", "tuned.bleu": "REGRESSION"}


def test_a_lost_or_non_finite_metric_fails():
    rows = {
        r["metric"]: r["status"]
        for r in compare(
            diff(tuned__exact_match=(0.8, None), tuned__test_loss=(0.5, float("nan"))), RULES, {}
        )
    }
    assert rows == {
        "tuned.exact_match": "REGRESSION (missing or not finite)",
        "tuned.test_loss": "REGRESSION (missing or not finite)",
    }


def test_base_metrics_are_context_not_checked_and_new_metrics_are_flagged():
    rows = compare(diff(base__exact_match=(0.5, 0.0), tuned__rouge_l=(None, 0.4)), RULES, {})
    assert [(r["metric"], r["status"]) for r in rows] == [("tuned.rouge_l", "new")]


def test_data_md5s_come_from_every_data_dep_and_out_of_the_lock():
    lock = """
schema: '2.0'
stages:
  validate:
    deps: [{path: data/raw, md5: a.dir}, {path: stages/validate.py, md5: x}]
    outs: [{path: data/interim/valid.jsonl, md5: b}]
"""
    assert lock_data_md5(lock) == {"data/raw": "a.dir", "data/interim/valid.jsonl": "b"}


def test_forgetting_deltas_are_checked_absolutely():
    rows = {
        r["metric"]: r["status"]
        for r in compare(
            diff(
                forgetting__loss_delta=(0.01, 0.10),
                forgetting__rouge_l_delta=(0.0, -0.01),
                forgetting__tuned_loss=(1.0, 9.0),
            ),
            RULES,
            {},
        )
    }
    assert rows == {"forgetting.loss_delta": "REGRESSION", "forgetting.rouge_l_delta": "ok"}

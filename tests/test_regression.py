"""regression: which metric changes count as regressions (absolute for rates, relative for loss)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from regression import compare, lock_data_md5  # noqa: E402

RULES = {"tolerance": {"default": 0.02, "test_loss": 0.10, "loss_delta": 0.05},
         "relative": ["test_loss"], "lower_is_better": ["test_loss", "loss_delta"]}


def diff(**changes):
    return {"reports/metrics.json": {k.replace("__", "."): {"old": o, "new": n}
                                     for k, (o, n) in changes.items()}}


def test_rates_may_drop_by_the_absolute_tolerance_only():
    rows = {r["metric"]: r["status"] for r in compare(diff(
        tuned__exact_match=(0.80, 0.79), tuned__format_adherence=(1.0, 0.97),
        tuned__urgency_accuracy=(0.5, 0.9)), RULES)}
    assert rows == {"tuned.exact_match": "ok", "tuned.format_adherence": "REGRESSION",
                    "tuned.urgency_accuracy": "ok"}


def test_loss_may_rise_by_the_relative_tolerance_only():
    rows = {r["metric"]: r["status"] for r in compare(diff(tuned__test_loss=(2.0, 2.1)), RULES)}
    assert rows == {"tuned.test_loss": "ok"}
    rows = {r["metric"]: r["status"] for r in compare(diff(tuned__test_loss=(2.0, 2.3)), RULES)}
    assert rows == {"tuned.test_loss": "REGRESSION"}


def test_base_metrics_are_context_not_checked_and_new_metrics_are_flagged():
    rows = compare(diff(base__exact_match=(0.5, 0.0), tuned__rouge_l=(None, 0.4)), RULES)
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
    rows = {r["metric"]: r["status"] for r in compare(diff(
        forgetting__loss_delta=(0.01, 0.10), forgetting__rouge_l_delta=(0.0, -0.01),
        forgetting__tuned_loss=(1.0, 9.0)), RULES)}
    assert rows == {"forgetting.loss_delta": "REGRESSION", "forgetting.rouge_l_delta": "ok"}

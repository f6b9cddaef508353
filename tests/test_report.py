"""report: the summary holds the per-example metrics evaluate lists; a diverged run's null
metrics are written as such, never a crash."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from conftest import set_params

from stages import report
from stages.common import page
from stages.common.files import read_jsonl, write_jsonl


def reports(tuned: dict, per_example: list[str]) -> dict:
    return {
        "metrics": {"tuned": tuned, "per_example": per_example, "forgetting": {"loss_delta": None}},
        "split": {"sizes": {"train": 10, "validation": 2, "test": 3}},
        "validate": {"rows_quarantined": 1},
        "augment": {"enabled": False, "kept": 0},
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


def test_the_card_says_what_the_objective_and_replay_added():
    grpo = {
        "name": "grpo",
        "prompts_per_step": 4,
        "num_generations": 4,
        "learning_rate": 2e-5,
        "beta": 0.0,
        "reward_model": None,
    }
    train = {
        "grpo": {
            "steps": 20,
            "rewards": {"format_adherence": 1.0, "exact_match": 0.5},
            "reward_first": 1.2,
            "reward_last": 1.6,
        }
    }
    line = report.objective_lines({"objective": grpo}, train)
    assert "then GRPO from the SFT model: 20 steps of 4 prompts x 4 sampled answers" in line
    assert "rewards format_adherence x1, exact_match x0.5" in line
    assert "mean reward 1.2 at the first step, 1.6 at the last" in line
    assert "one-score head" in report.objective_lines({"objective": {"name": "reward"}}, {})
    assert report.objective_lines({"objective": {"name": "sft"}}, {}) == ""
    replay = {"path": "r.jsonl", "fraction": 0.2, "rows_mixed": 48, "rows_left_out": 1}
    assert "48 general rows from `r.jsonl`" in report.replay_line({"replay": replay})
    assert report.replay_line({"replay": {"fraction": 0.0, "rows_mixed": 0}}) == ""
    assert report.replay_line({}) == ""  # a split report written before replay existed


def test_the_card_and_summary_show_the_red_team_results():
    safety = {
        "examples": 3,
        "sources": ["data/redteam/t.jsonl"],
        "judge": None,
        "base": {"pass_rate": 0.0, "by_category": {"abuse": 0.0, "empty_input": 0.0}},
        "tuned": {"pass_rate": 0.6667, "by_category": {"abuse": 1.0, "empty_input": 0.5}},
        "failures": {"base": [{}, {}, {}], "tuned": [{"id": "e2"}]},
    }
    section = report.safety_section({"safety": safety})
    assert "## Safety: red-team prompts (3)" in section
    assert "| **all** | **0.00** | **0.67** |" in section
    assert "| empty_input | 0.00 | 0.50 |" in section
    assert "1 tuned answer(s) failed" in section
    assert report.safety_section({}) == ""  # a reward model answers no red-team prompt
    out = reports({"exact_match": 1.0}, ["exact_match"])
    out["metrics"]["safety"] = safety
    assert report.summary(out)["safety"] == 0.6667


def test_the_card_counts_the_human_review():
    done = {
        "sheets": {"data/review/a.csv": "x"},
        "reviewed": 5,
        "verdicts": {"right": 3, "wrong": 2, "unsure": 0},
        "corrections": 2,
        "records_corrected": 1,
        "mode": "relabel",
        "unmatched": [{"sheet": "data/review/a.csv", "line": 4}],
    }
    line = report.review_line({"review": done})
    assert "human review: 5 answers in 1 sheet(s) of `data/review/` (right 3, wrong 2" in line
    assert "2 corrections, 1 records corrected (data.review.corrections relabel); 1 matched" in line
    assert report.review_line({"review": {**done, "reviewed": 0}}) == ""
    assert report.review_line({}) == ""  # a validate report from before review sheets


@pytest.fixture
def browser() -> str:
    """Headless Chromium (Debian's `chromium`); CI sets REQUIRE_BROWSER so it cannot skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(
                "REQUIRE_BROWSER is set and no chromium is installed: apt-get install chromium"
            )
        pytest.skip("no headless browser here: apt-get install chromium")
    return found


class Page(HTMLParser):
    """The rendered DOM's section ids and every figure's data-key -> text."""

    def __init__(self):
        super().__init__()
        self.sections, self.figures, self.open = [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        self.open.append(attrs.get("data-key"))

    def handle_endtag(self, tag):
        self.open.pop()

    def handle_data(self, data):
        if self.open and self.open[-1]:
            self.figures[self.open[-1]] = self.figures.get(self.open[-1], "") + data


def test_the_report_page_shows_every_section_with_the_runs_numbers(project, browser):
    """The whole pipeline on the tiny model, then reports/index.html opened from file:// in a
    real headless browser: every section is there, every figure equals its JSON report, and the
    page's script ran (the predictions filter counts its rows)."""
    from stages import augment, base_model, dedup, evaluate, export, split, train, validate

    # augment on: the tiny model's paraphrases (all rejected) still give the page its section
    set_params(
        project, **{"augment.min_rows": 6, "augment.per_row": 1, "augment.max_new_tokens": 8}
    )
    for stage in (base_model, validate, dedup, split, augment, train, export, evaluate):
        stage.main()
    predictions = read_jsonl(project / "reports/predictions.jsonl")
    predictions[0]["input"] = '<b id="injected">a ticket with markup</b>'
    write_jsonl(project / "reports/predictions.jsonl", predictions)
    report.main()
    index = project / "reports/index.html"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", index.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    parsed = Page()
    parsed.feed(dom)
    assert parsed.sections == list(page.SECTIONS)  # the tiny run has every part
    sources = {
        name: json.loads((project / f"reports/{file}.json").read_text())
        for name, file in [
            ("metrics", "metrics"),
            ("train", "train"),
            ("validate", "validate"),
            ("dedup", "dedup"),
            ("split", "split"),
            ("augment", "augment"),
            ("manifest", "manifest"),
        ]
    }
    assert len(parsed.figures) > 40
    for key, text in parsed.figures.items():
        name, *path = key.split(".")
        value = sources[name]
        for part in path:
            value = value[part]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(text) == pytest.approx(value, abs=1e-4), key
        else:
            assert text == str(value), key
    n = len((project / "reports/predictions.jsonl").read_text().splitlines())
    assert re.search(rf'id="shown"[^>]*>{n} of {n} shown<', dom)  # the script ran
    # text from the data is shown as text, never run as markup
    assert '<b id="injected">' not in dom and '&lt;b id="injected"&gt;' in dom

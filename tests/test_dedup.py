"""dedup: exact and near duplicates collapse to one row; conflicting answers follow the policy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import set_params

from stages import dedup
from stages.common.files import read_jsonl, write_jsonl
from stages.common.records import record_id
from stages.common.similarity import signatures, text_digests

A = '{"urgency": "high", "category": "billing"}'
B = '{"urgency": "low", "category": "billing"}'


def rec(line: int, user: str, answer: str) -> dict:
    messages = [
        {"role": "system", "content": "Triage."},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"id": record_id(messages), "source": "raw.jsonl", "line": line, "messages": messages}


TICKET = "My card was charged twice for the Pro plan this month and I need a refund today please"
ROWS = [
    rec(1, TICKET, A),
    rec(2, TICKET.upper() + "  ", A),  # exact after normalisation
    rec(3, TICKET + " thanks in advance", A),  # near duplicate, same answer
    rec(4, "The iOS app crashes whenever I open the reports screen after the update", A),
    rec(
        5, "The iOS app crashes whenever I open the reports screen after the update!", B
    ),  # conflict
    rec(6, "Please add a dark mode to the web app, no rush at all", B),
]


def run(project, policy="drop_all"):
    write_jsonl(project / "data/interim/valid.jsonl", ROWS)
    set_params(project, **{"dedup.conflict_policy": policy})
    dedup.main()
    kept = read_jsonl(project / "data/interim/dedup.jsonl")
    removed = read_jsonl(project / "data/interim/dedup_removed.jsonl")
    report = json.loads((project / "reports/dedup.json").read_text())
    return [r["line"] for r in kept], {r["line"]: r["reason"] for r in removed}, report


def test_duplicates_and_conflicts_drop_all(project):
    kept, removed, report = run(project)
    assert kept == [1, 6]
    assert removed == {
        2: "exact_duplicate",
        3: "near_duplicate",
        4: "conflicting_answers",
        5: "conflicting_answers",
    }
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"] == 6


@pytest.mark.parametrize("policy, kept_conflict", [("first", 4), ("majority", None)])
def test_conflict_policies(project, policy, kept_conflict):
    kept, removed, _ = run(project, policy)
    # majority with a 1:1 tie has nothing to trust, so it drops both
    assert (kept_conflict in kept) if kept_conflict else (4 not in kept and 5 not in kept)


def test_removed_rows_point_at_what_they_duplicate(project):
    run(project)
    removed = read_jsonl(project / "data/interim/dedup_removed.jsonl")
    exact = next(r for r in removed if r["line"] == 2)
    assert exact["duplicate_of_line"] == 1 and exact["duplicate_of"] == ROWS[0]["id"]


def test_system_prompt_does_not_make_tickets_alike(project):
    """A long shared system prompt would push every pair over the threshold; it is ignored."""
    system = {"role": "system", "content": " ".join(f"rule{i}" for i in range(60))}
    rows = []
    for i, user in enumerate(
        [
            "the app crashes on start",
            "my parcel never arrived here",
            "please refund the double charge",
        ]
    ):
        messages = [system, {"role": "user", "content": user}, {"role": "assistant", "content": A}]
        rows.append(
            {"id": record_id(messages), "source": "raw.jsonl", "line": i + 1, "messages": messages}
        )
    write_jsonl(project / "data/interim/valid.jsonl", rows)
    dedup.main()
    assert len(read_jsonl(project / "data/interim/dedup.jsonl")) == 3


def test_preference_and_text_kinds(project):
    def pref(line, prompt, chosen, rejected):
        fields = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        return {
            "id": record_id(fields),
            "source": "p.jsonl",
            "line": line,
            "kind": "preference",
            **fields,
        }

    write_jsonl(
        project / "data/interim/valid.jsonl",
        [
            pref(1, TICKET, A, "no idea"),
            pref(2, TICKET + " thanks in advance", A, "no idea"),
            pref(3, "The iOS app crashes on the reports screen", A, B),
            pref(4, "The iOS app crashes on the reports screen", B, A),
        ],
    )  # preference flipped
    _, removed, _ = run_rows(project)
    assert removed == {2: "near_duplicate", 3: "conflicting_answers", 4: "conflicting_answers"}

    text = "Refunds are issued within five business days of the request being approved by billing."
    write_jsonl(
        project / "data/interim/valid.jsonl",
        [
            {"id": record_id(t), "source": "t.jsonl", "line": i + 1, "kind": "text", "text": t}
            for i, t in enumerate([text, text + " See the policy.", "Shipping takes two weeks."])
        ],
    )
    kept, removed, _ = run_rows(project)
    assert kept == [1, 3] and removed == {2: "near_duplicate"}


def run_rows(project):
    dedup.main()
    kept = read_jsonl(project / "data/interim/dedup.jsonl")
    removed = read_jsonl(project / "data/interim/dedup_removed.jsonl")
    return [r["line"] for r in kept], {r["line"]: r["reason"] for r in removed}, None


def test_fixed_evaluation_rows_pass_through_untouched(project):
    # a fixed test row duplicating a pool row: dedup keeps both (split removes the pool one)
    fixed = {**rec(1, TICKET, A), "source": "data/eval/test.jsonl", "fixed_split": "test"}
    write_jsonl(project / "data/interim/valid.jsonl", ROWS + [fixed, dict(fixed, line=2)])
    dedup.main()
    kept = read_jsonl(project / "data/interim/dedup.jsonl")
    assert [r for r in kept if r.get("fixed_split")] == [fixed, dict(fixed, line=2)]
    report = json.loads((project / "reports/dedup.json").read_text())
    assert report["fixed_rows_passed"] == {"test": 2}
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"] == len(ROWS) + 2


# --- the steps, directly ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, answers, kept, reasons",
    [
        ("drop_all", ["a", "a", "a"], [0], {1: "near_duplicate", 2: "near_duplicate"}),
        ("drop_all", ["a", "b", "a"], [], dict.fromkeys((0, 1, 2), "conflicting_answers")),
        ("first", ["b", "a", "a"], [0], {1: "conflicting_answers", 2: "conflicting_answers"}),
        ("majority", ["b", "a", "a"], [1], {0: "conflicting_answers", 2: "conflicting_answers"}),
        ("majority", ["a", "b"], [], {0: "conflicting_answers", 1: "conflicting_answers"}),
    ],
)
def test_resolve_cluster(policy, answers, kept, reasons):
    """Agreeing answers keep the first row; disagreeing ones follow the policy, and a tie has
    no majority."""
    assert dedup.resolve_cluster(list(range(len(answers))), answers, policy) == (kept, reasons)


def test_exact_duplicates_point_at_the_first_copy():
    ids = np.array([int(x, 16) for x in ("0a", "0b", "0a", "0a")], dtype=np.uint64)
    assert dedup.exact_duplicates(ids) == {
        2: ("exact_duplicate", 0),
        3: ("exact_duplicate", 0),
    }


def test_same_request_clusters_join_equal_and_near_equal_requests():
    base = "my invoice shows a charge twice for the same month and I want a refund please"
    texts = [base, "something else entirely about a parcel", base, base + " now", "unrelated"]
    requests, minhashes = text_digests(texts), signatures(texts, size=3, num_perm=128, seed=0)
    every_row = np.arange(len(texts))
    assert dedup.same_request_clusters(requests, minhashes, 0.7, every_row) == [[0, 2, 3]]
    # the rows compared can be a subset (exact duplicates already removed): positions in it
    assert dedup.same_request_clusters(requests, minhashes, 0.7, np.array([1, 2, 3])) == [[1, 2]]


@pytest.mark.parametrize("policy", ["drop_all", "majority"])
def test_chunks_and_workers_change_no_output_byte(project, monkeypatch, policy):
    """dedup reads its input a chunk at a time (DATA_CHUNK_ROWS) in worker processes
    (DATA_WORKERS) or Ray (data.engine=ray) and keeps small arrays per row (ids, hashes,
    signatures on disk): the outputs are the same bytes however the rows were cut and shared.
    Fixed-set rows pass through after the pool, in their order."""
    rows = [
        {**r, "line": 10 * k + r["line"], "id": f"{int(r['id'], 16) ^ k:016x}"}
        if k % 3
        else {**r, "line": 10 * k + r["line"]}
        for k in range(8)
        for r in ROWS
    ]
    rows[5] = {**rows[5], "fixed_split": "test"}
    outputs = ("data/interim/dedup.jsonl", "data/interim/dedup_removed.jsonl", "reports/dedup.json")
    runs = []
    # the last run: Ray tasks and a Ray Data groupby for the LSH buckets, on 2 local CPUs
    for chunk_rows, workers, engine in (
        ("100000", "1", "local"),
        ("5", "2", "local"),
        ("5", "2", "ray"),
    ):
        monkeypatch.setenv("DATA_CHUNK_ROWS", chunk_rows)
        monkeypatch.setenv("DATA_WORKERS", workers)
        write_jsonl(project / "data/interim/valid.jsonl", rows)
        set_params(project, **{"dedup.conflict_policy": policy, "data.engine": engine})
        if engine == "ray":  # as DVC runs it: stages.dedup is __main__ there, which Ray pickles
            subprocess.run([sys.executable, "-m", "stages.dedup"], cwd=project, check=True)
        else:
            dedup.main()
        runs.append({p: (project / p).read_bytes() for p in outputs})
    assert runs[1] == runs[0] and runs[2] == runs[0]
    report = json.loads(runs[0]["reports/dedup.json"])
    assert report["fixed_rows_passed"] == {"test": 1}
    assert report["removed_by_reason"]["exact_duplicate"] > 0
    assert report["rows_in"] == len(rows) == report["rows_out"] + report["rows_removed"]
    assert read_jsonl(project / "data/interim/dedup.jsonl")[-1]["fixed_split"] == "test"

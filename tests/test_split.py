"""split: fractions hold, strata spread over splits, same seed gives byte-identical files."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import set_params
from helpers import CATEGORIES as CAT
from helpers import URGENCIES as URG
from helpers import labelled_rows as rows

from stages import split
from stages.common.config import StageError
from stages.common.files import read_jsonl, write_jsonl
from stages.common.records import record_id


@pytest.fixture
def project(project):
    """Split's own tests count task rows; replay (on by default) has its tests at the end."""
    set_params(project, **{"data.replay.fraction": 0})
    return project


def run(project):
    split.main()
    return {name: (project / f"data/processed/{name}.jsonl").read_bytes() for name in split.SPLITS}


def test_sizes_strata_and_reconciliation(project):
    write_jsonl(project / "data/interim/dedup.jsonl", rows())
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    assert report["sizes"] == {"train": 192, "validation": 24, "test": 24}
    assert report["rows_in"] == report["rows_out"] == 240
    test = read_jsonl(project / "data/processed/test.jsonl")
    # 12 strata of 20 rows: each gets exactly 2 test rows
    strata = Counter(r["messages"][-1]["content"] for r in test)
    assert len(strata) == 12 and set(strata.values()) == {2}
    ids = [
        {r["id"] for r in read_jsonl(project / f"data/processed/{n}.jsonl")} for n in split.SPLITS
    ]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_same_seed_same_bytes_other_seed_other_split(project):
    write_jsonl(project / "data/interim/dedup.jsonl", rows())
    first, again = run(project), run(project)
    assert first == again
    set_params(project, seed=7)
    assert run(project)["test"] != first["test"]


def test_quotas_use_largest_remainder():
    assert split.quotas({"a": 5, "b": 5, "c": 1}, 0.1) == {"a": 1, "b": 0, "c": 0}
    assert sum(split.quotas({"a": 7, "b": 3}, 0.5).values()) == 5


def chat_row(line: int, user: str, answer: str) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": record_id(messages), "source": "raw.jsonl", "line": line, "messages": messages}


def paraphrases(n_groups=30, size=4):
    """Groups of near-alike tickets: one random 20-word ticket per group, four sign-offs."""
    import random

    rng, out = random.Random(0), []
    for g in range(n_groups):
        base = " ".join(f"word{rng.randrange(500)}" for _ in range(20))
        answer = json.dumps({"urgency": URG[g % 4], "category": CAT[g % 3]})
        out += [
            chat_row(len(out) + 1, f"group{g} {base} {closing}", answer)
            for closing in ["thanks", "cheers", "regards", "please help"][:size]
        ]
    return out


def test_near_alike_requests_never_straddle_splits(project):
    write_jsonl(project / "data/interim/dedup.jsonl", paraphrases())
    run(project)
    where = {}
    for name in split.SPLITS:
        for r in read_jsonl(project / f"data/processed/{name}.jsonl"):
            where.setdefault(r["messages"][0]["content"].split()[0], set()).add(name)
    assert len(where) == 30, where
    assert all(len(splits) == 1 for splits in where.values()), where
    report = json.loads((project / "reports/split.json").read_text())
    assert report["groups"]["multi_row"] == 30 and report["groups"]["largest"] == 4


def test_leakage_reported_then_removed(project):
    import random

    rng, records = random.Random(1), rows(200)
    for pair in range(20):  # a ticket and its copy with one word added, free to split apart
        words = " ".join(f"word{rng.randrange(500)}" for _ in range(14))
        answer = records[pair]["messages"][1]["content"]
        records += [
            chat_row(1000 + 2 * pair, words, answer),
            chat_row(1001 + 2 * pair, words + " ref", answer),
        ]
    write_jsonl(project / "data/interim/dedup.jsonl", records)
    set_params(project, **{"split.group_threshold": None})
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    flagged = report["leakage"]["rows"]
    assert report["leakage"]["policy"] == "report" and report["rows_removed"] == 0
    assert flagged and all(row["line"] >= 1000 and row["against"] == "train" for row in flagged)
    assert all(abs(row["line"] - row["matches_line"]) == 1 for row in flagged)  # its twin

    set_params(project, **{"split.leakage.policy": "remove"})
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    removed = read_jsonl(project / "data/interim/split_removed.jsonl")
    assert len(removed) == report["rows_removed"] == len(flagged)
    assert {r["reason"] for r in removed} == {"leak_test_train"}
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"]

    set_params(project, **{"split.group_threshold": 0.5})  # groups keep twins together
    run(project)
    assert json.loads((project / "reports/split.json").read_text())["leakage"]["flagged"] == 0


def test_external_eval_set_is_kept_out(project):
    records = rows(100)
    write_jsonl(project / "data/interim/dedup.jsonl", records)
    external = project / "data/eval/benchmark.jsonl"
    write_jsonl(external, [{"messages": records[5]["messages"]}, {"text": "unrelated words"}])
    set_params(
        project,
        **{
            "split.leakage.external_eval": "data/eval/benchmark.jsonl",
            "split.leakage.policy": "remove",
        },
    )
    run(project)
    removed = read_jsonl(project / "data/interim/split_removed.jsonl")
    assert [(r["line"], r["reason"]) for r in removed] == [(6, "leak_external_eval")]


def test_rebalance_cap_and_upsample(project):
    skewed = [r for r in rows(240) if "billing" in r["messages"][1]["content"]] + rows(240)[:24]
    write_jsonl(project / "data/interim/dedup.jsonl", skewed)
    set_params(
        project,
        **{"task.stratify_by": ["category"], "split.rebalance": "cap", "split.rebalance_cap": 10},
    )
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    assert max(report["class_balance"]["train"].values()) == 10
    assert report["removed_by_reason"]["rebalance_cap"] == report["rows_removed"] > 0
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"]

    set_params(project, **{"split.rebalance": "upsample", "split.rebalance_cap": None})
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    assert len(set(report["class_balance"]["train"].values())) == 1  # every stratum equal
    assert report["rows_added_by_upsampling"] > 0 and report["rows_removed"] == 0


def fixed_rows(n: int, start: int = 1000) -> list[dict]:
    """Rows of a fixed test file (tagged by validate), with requests long enough to paraphrase."""
    out = []
    for i in range(start, start + n):
        messages = [
            {
                "role": "user",
                "content": f"Order {i} arrived broken and the box was soaked "
                f"when the courier left it at the door on day {i}",
            },
            {
                "role": "assistant",
                "content": json.dumps({"urgency": URG[i % 4], "category": CAT[i % 3]}),
            },
        ]
        out.append(
            {
                "id": record_id(messages),
                "source": "data/eval/test.jsonl",
                "line": i - start + 1,
                "messages": messages,
                "fixed_split": "test",
            }
        )
    return out


def test_a_fixed_test_set_stays_whole_and_train_drops_what_is_close_to_it(project):
    fixed = fixed_rows(30)
    copy = {**fixed[0], "source": "raw.jsonl", "line": 901}
    del copy["fixed_split"]
    paraphrase = json.loads(json.dumps(copy))
    paraphrase["messages"][0]["content"] += " Please help, thanks."
    paraphrase.update(line=902, id=record_id(paraphrase["messages"]))
    write_jsonl(project / "data/interim/dedup.jsonl", rows(200) + [copy, paraphrase] + fixed)
    first = run(project)
    report = json.loads((project / "reports/split.json").read_text())
    assert report["sizes"]["test"] == 30 and report["fixed_sets"] == {"test": 30}
    test = read_jsonl(project / "data/processed/test.jsonl")
    assert [r["id"] for r in test] == [r["id"] for r in fixed]
    removed = {
        r["line"]: r["reason"] for r in read_jsonl(project / "data/interim/split_removed.jsonl")
    }
    assert removed == {901: "duplicate_of_test", 902: "near_duplicate_of_test"}
    # the carve shares what the fixed test leaves: validation 0.1 / (0.8 + 0.1) of the pool
    assert report["sizes"]["validation"] == 22 and report["rows_in"] == 232
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"]

    # more training data: the test split does not move by a byte, nor its hash
    write_jsonl(project / "data/interim/dedup.jsonl", rows(260) + [copy, paraphrase] + fixed)
    again = run(project)
    assert again["test"] == first["test"]
    assert (
        json.loads((project / "reports/split.json").read_text())["test_hash"]
        == (report["test_hash"])
    )


def test_a_training_row_that_leaks_a_fixed_row_is_removed(project):
    fixed = fixed_rows(10)
    leak = {
        "messages": [
            {
                "role": "user",
                "content": "Quoting my colleague: " + fixed[3]["messages"][0]["content"],
            },
            {"role": "assistant", "content": fixed[3]["messages"][1]["content"]},
        ]
    }
    leak.update(id=record_id(leak["messages"]), source="raw.jsonl", line=999)
    set_params(project, **{"split.group_threshold": None})  # only the n-gram check can see it
    write_jsonl(project / "data/interim/dedup.jsonl", rows(100) + [leak] + fixed)
    run(project)
    removed = read_jsonl(project / "data/interim/split_removed.jsonl")
    assert [(r["line"], r["reason"]) for r in removed] == [(999, "leak_of_test")]


def test_fixed_validation_and_test_sets_leave_the_whole_pool_to_train(project):
    fixed = fixed_rows(20)
    for r in fixed[10:]:
        r["fixed_split"] = "validation"
    write_jsonl(project / "data/interim/dedup.jsonl", rows(100) + fixed)
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    assert report["sizes"] == {"train": 100, "validation": 10, "test": 10}
    assert report["fixed_sets"] == {"validation": 10, "test": 10}
    validation = read_jsonl(project / "data/processed/validation.jsonl")
    assert [r["id"] for r in validation] == [r["id"] for r in fixed[10:]]


# --- the steps, directly ----------------------------------------------------------------------


def test_stratified_group_split_keeps_groups_whole_and_fills_quotas():
    strata = ["a"] * 10 + ["b"] * 10
    groups = [[0, 1, 2]] + [[i] for i in range(3, 20)]
    fractions = {"train": 0.6, "validation": 0.2, "test": 0.2}
    assignment = split.stratified_group_split(strata, groups, fractions, seed=1)
    assert len({assignment[i] for i in (0, 1, 2)}) == 1  # one group, one split
    for stratum in "ab":
        rows = [a for a, s in zip(assignment, strata) if s == stratum]
        assert rows.count("test") == 2 and rows.count("validation") == 2
    assert assignment == split.stratified_group_split(strata, groups, fractions, seed=1)
    assert assignment != split.stratified_group_split(strata, groups, fractions, seed=2)


def test_ngram_overlap_names_the_reference_row():
    def ask(text):  # the request is the prompt: the turns before the answer
        return {
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
        }

    words = " ".join(f"w{i}" for i in range(30))
    index = split.NgramIndex([ask("other text " * 10), ask(words)], short_words=5, sizes={8, 13})
    share, match = index.overlap(ask(words + " extra"))  # 18 of its 19 13-grams
    assert match == 1 and share == 18 / 19
    assert index.overlap(ask(words)) == (1.0, 1)  # the same request
    assert index.overlap(ask("nothing in common at all " * 4)) == (0.0, None)


def test_rebalance_train_caps_or_upsamples_each_stratum():
    strata = ["a"] * 6 + ["b"] * 2
    task = type("T", (), {"stratify_by": ["category"]})()
    removed: dict = {}
    cfg = {"rebalance": "cap", "rebalance_cap": 3}
    assert split.rebalance_train(list(range(8)), strata, removed, cfg, task, seed=0) == []
    assert len(removed) == 3 and all(strata[i] == "a" for i in removed)
    removed = {}
    cfg = {"rebalance": "upsample", "rebalance_cap": None}
    added = split.rebalance_train(list(range(8)), strata, removed, cfg, task, seed=0)
    assert sorted(added) == [6, 6, 7, 7] and removed == {}


def test_replay_mixes_general_rows_into_train_and_keeps_the_probe_out(project):
    """data.replay: general chat rows make up `fraction` of train after mixing (the set repeats
    when small), marked as replay and outside the task's class balance; a row that copies a
    forgetting-probe question is left out and written down; the task rows still reconcile."""
    write_jsonl(project / "data/interim/dedup.jsonl", rows())
    probe = read_jsonl(project / "data/general/instructions.jsonl")
    general = [
        {
            "messages": [
                {"role": "user", "content": f"Name a word that rhymes with {w}."},
                {"role": "assistant", "content": f"A word that rhymes with {w} is {r}."},
            ]
        }
        for w, r in [("cat", "hat"), ("tree", "bee"), ("light", "kite"), ("rain", "train")]
    ] + [{"messages": probe[0]["messages"]}]  # a copy of the probe's first question
    write_jsonl(project / "data/replay/mine.jsonl", general)
    set_params(
        project, **{"data.replay.path": "data/replay/mine.jsonl", "data.replay.fraction": 0.2}
    )
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    train = read_jsonl(project / "data/processed/train.jsonl")
    replayed = [r for r in train if r.get("replay")]
    assert len(train) - len(replayed) == 192 and len(replayed) == 48  # 48 / 240 = 0.2
    assert report["replay"] | {"set_hash": None} == {
        "path": "data/replay/mine.jsonl",
        "fraction": 0.2,
        "rows_read": 5,
        "rows_left_out": 1,
        "rows_mixed": 48,
        "rows_repeated": 44,
        "set_hash": None,
    }
    assert {r["messages"][0]["content"] for r in replayed} == {
        g["messages"][0]["content"] for g in general[:4]
    }
    assert sum(report["class_balance"]["train"].values()) == 192
    assert report["rows_in"] == report["rows_out"] == 240
    removed = read_jsonl(project / "data/interim/split_removed.jsonl")
    assert [(r["split"], r["reason"], r["matches_line"]) for r in removed] == [
        ("replay", "replay_close_to_general_probe", 1)
    ]


def test_replay_is_for_chat_training_only(project):
    preference = [
        {
            "id": str(i),
            "source": "p.jsonl",
            "line": i + 1,
            "prompt": r["messages"][:2],
            "chosen": r["messages"][2:],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i, r in enumerate(rows())
    ]
    write_jsonl(project / "data/interim/dedup.jsonl", preference)
    set_params(project, **{"data.replay.fraction": 0.2})
    with pytest.raises(StageError, match="set data.replay.fraction=0"):
        split.main()


def test_a_reviewed_correction_moved_into_train_lands_in_train(project):
    """data.review.corrections=train: validate tags the corrected example `fixed_split: train`;
    split puts it in train whatever the carve says, and the fixed test set keeps the rest."""
    fixed = fixed_rows(10)
    moved = {**fixed_rows(1, start=5000)[0], "fixed_split": "train"}
    write_jsonl(project / "data/interim/dedup.jsonl", rows(200) + [moved] + fixed)
    run(project)
    report = json.loads((project / "reports/split.json").read_text())
    train = read_jsonl(project / "data/processed/train.jsonl")
    assert moved["id"] in {r["id"] for r in train}
    assert report["sizes"]["test"] == 10 and report["rows_in"] == report["rows_out"] == 211


def test_chunks_and_workers_change_no_output_byte(project, monkeypatch):
    """split reads its input a chunk at a time (DATA_CHUNK_ROWS) in worker processes
    (DATA_WORKERS), keeping small values per row (split, stratum, digests, signatures on
    disk); the outputs are the same bytes however the rows were cut and shared, with groups,
    a carved test set checked against train, upsampling and replay all at work."""
    records = rows()
    for k in range(10):
        short = " ".join(f"w{k}x{j}" for j in range(15))  # a leak when its long form trains
        long_ = short + " " + " ".join(f"tail{k}x{j}" for j in range(30))
        for text in (short, long_, short + " please"):
            messages = [{"role": "user", "content": text}, records[k]["messages"][1]]
            records.append({**records[k], "id": record_id(messages), "messages": messages})
    for i, r in enumerate(records):
        r["line"] = i + 1
    set_params(
        project,
        **{
            "data.replay.fraction": 0.1,
            "split.rebalance": "upsample",
            "split.leakage.policy": "remove",
            "split.test": 0.4,
            "split.validation": 0.1,
            "split.train": 0.5,
        },
    )
    outputs = [f"data/processed/{n}.jsonl" for n in split.SPLITS]
    outputs += ["data/interim/split_removed.jsonl", "reports/split.json"]
    runs = []
    # the last run: Ray tasks and a Ray Data groupby for the LSH buckets, on 2 local CPUs
    for chunk_rows, workers, engine in (
        ("100000", "1", "local"),
        ("13", "2", "local"),
        ("13", "2", "ray"),
    ):
        monkeypatch.setenv("DATA_CHUNK_ROWS", chunk_rows)
        monkeypatch.setenv("DATA_WORKERS", workers)
        set_params(project, **{"data.engine": engine})
        write_jsonl(project / "data/interim/dedup.jsonl", records)
        split.main()
        runs.append({p: (project / p).read_bytes() for p in outputs})
    assert runs[1] == runs[0] and runs[2] == runs[0]
    report = json.loads(runs[0]["reports/split.json"])
    assert report["groups"]["multi_row"] >= 10
    assert report["removed_by_reason"]["leak_test_train"] > 0
    assert report["rows_added_by_upsampling"] > 0 and report["replay"]["rows_mixed"] > 0

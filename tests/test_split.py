"""split: fractions hold, strata spread over splits, same seed gives byte-identical files."""

from __future__ import annotations

import json
from collections import Counter

from conftest import set_params
from stages import split
from stages.common.files import read_jsonl, write_jsonl
from stages.common.records import record_id

URG, CAT = ["low", "medium", "high", "critical"], ["billing", "technical", "account"]


def rows(n=240):
    out = []
    for i in range(n):
        answer = json.dumps({"urgency": URG[i % 4], "category": CAT[i % 3]})
        messages = [{"role": "user", "content": f"ticket {i}"},
                    {"role": "assistant", "content": answer}]
        out.append({"id": record_id(messages), "source": "raw.jsonl", "line": i + 1,
                    "messages": messages})
    return out


def run(project):
    split.main()
    return {name: (project / f"data/processed/{name}.jsonl").read_bytes()
            for name in split.SPLITS}


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
    ids = [set(r["id"] for r in read_jsonl(project / f"data/processed/{n}.jsonl"))
           for n in split.SPLITS]
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

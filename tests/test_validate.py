"""validate: every defect gets its reason code and line; counts reconcile; the gate fails loudly."""

from __future__ import annotations

import json

import pytest

from conftest import set_params
from stages import validate
from stages.common.config import StageError
from stages.common.files import read_jsonl

SYSTEM = {"role": "system", "content": "Triage."}
GOOD_ANSWER = '{"urgency": "high", "category": "billing"}'


def chat(user="I was charged twice.", answer=GOOD_ANSWER, **extra):
    return {"messages": [SYSTEM, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}], **extra}


DEFECTS = {  # expected reason -> raw line
    "malformed_json": '{"messages": [{"role": "user", "content": "cut off',
    "not_an_object": json.dumps(["a", "list"]),
    "missing_messages": json.dumps({"conversation": []}),
    "messages_not_a_list": json.dumps({"messages": "hello"}),
    "message_missing_key": json.dumps({"messages": [{"role": "user"}]}),
    "unknown_role": json.dumps({"messages": [SYSTEM, {"role": "customer", "content": "Hi"},
                                             {"role": "assistant", "content": GOOD_ANSWER}]}),
    "no_assistant": json.dumps({"messages": [SYSTEM, {"role": "user", "content": "Hi"}]}),
    "empty_assistant": json.dumps(chat(answer="  ")),
    "empty_content": json.dumps(chat(user=" ")),
    "answer_format": json.dumps(chat(answer=GOOD_ANSWER + " Hope that helps!")),  # whole answer
    "label_outside_set": json.dumps(chat(answer='{"urgency": "high", "category": "sales"}')),
    "too_long": json.dumps(chat(user="log line " * 400)),
    "bad_role_order": json.dumps({"messages": [{"role": "user", "content": "a"}, SYSTEM,
                                               {"role": "assistant", "content": GOOD_ANSWER}]}),
}


@pytest.fixture
def validated(project):
    from stages import base_model

    base_model.main()
    good = [json.dumps(chat(user=f"Ticket number {i}: my card was charged twice."))
            for i in range(10)]
    lines = good[:5] + list(DEFECTS.values()) + good[5:]
    (project / "data/raw/tickets.jsonl").write_bytes(
        ("\n".join(lines) + "\n").encode() + b'\xff\xfe{"bad utf8": 1}\n')
    set_params(project, **{"data.max_rejected_fraction": 0.9})
    validate.main()
    return project


def test_each_defect_gets_its_reason_and_line(validated):
    quarantine = read_jsonl(validated / "data/interim/quarantine.jsonl")
    by_line = {q["line"]: q for q in quarantine}
    for offset, reason in enumerate(DEFECTS):
        line = 6 + offset  # five good lines come first
        assert line in by_line, f"{reason} (line {line}) not quarantined"
        assert reason in by_line[line]["reasons"], (reason, by_line[line]["reasons"])
        assert by_line[line]["source"].endswith("tickets.jsonl")
    invalid_utf8 = [q for q in quarantine if "invalid_utf8" in q["reasons"]]
    assert len(invalid_utf8) == 1 and invalid_utf8[0]["raw"]  # the bytes are kept, not lost


def test_counts_reconcile_and_valid_rows_are_canonical(validated):
    report = json.loads((validated / "reports/validate.json").read_text())
    valid = read_jsonl(validated / "data/interim/valid.jsonl")
    quarantine = read_jsonl(validated / "data/interim/quarantine.jsonl")
    assert report["rows_in"] == 10 + len(DEFECTS) + 1
    assert report["rows_out"] == len(valid) == 10
    assert report["rows_quarantined"] == len(quarantine) == len(DEFECTS) + 1
    assert report["rows_in"] == report["rows_out"] + report["rows_quarantined"]
    assert sum(1 for q in quarantine if "too_long" in q["reasons"]) == 1
    assert {"id", "source", "line", "messages"} <= set(valid[0])
    assert report["token_length"]["max"] <= report["max_length"]


def test_gate_fails_with_top_reasons_and_lines(validated):
    set_params(validated, **{"data.max_rejected_fraction": 0.1})
    with pytest.raises(StageError, match=r"validation gate failed.*tickets.jsonl:\d+"):
        validate.main()


def test_fatal_reason_fails_on_a_single_row(validated):
    set_params(validated, **{"data.fatal_reasons": ["invalid_utf8"]})
    with pytest.raises(StageError, match="fatal reasons"):
        validate.main()


def test_missing_data_file_is_one_line_error(project):
    set_params(project, **{"data.path": "data/raw/nothing.jsonl"})
    with pytest.raises(StageError, match="nothing.jsonl: no such file"):
        validate.main()

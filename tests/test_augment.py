"""augment: rare strata of train get paraphrases, and only those that pass every check stay.

Its contract: off by default (empty outputs); a stratum under augment.min_rows is topped up
from its own rows; each candidate passes validate's suite, dedup against every split and the
task's label check, or is written down with its reason; kept rows carry their provenance;
validation and test are never touched; train reads the kept rows."""

from __future__ import annotations

import json

import pytest
from conftest import set_params
from helpers import openai_endpoint

from stages import augment, base_model, train
from stages.common import paths
from stages.common.config import StageError
from stages.common.files import md5_path, read_jsonl, write_json, write_jsonl
from stages.common.records import record_id

SYSTEM = "You triage customer-support tickets. Reply with one line of JSON."


def row(user: str, urgency: str, category: str, line: int) -> dict:
    answer = json.dumps({"urgency": urgency, "category": category})
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {
        "id": record_id({"messages": messages}),
        "source": "data/raw/tickets.jsonl",
        "line": line,
        "kind": "messages",
        "messages": messages,
    }


FIRE = "The charger I bought last week melted and started smoking on my desk."
SLOW = "The dashboard takes a long time to load every morning since the update."
TRAIN = [
    *(
        row(f"I was charged twice for order {n}, please refund one.", "high", "billing", n)
        for n in range(1, 6)
    ),
    row(FIRE, "critical", "product", 6),  # product|critical: 1 row
    row(SLOW, "low", "technical", 7),  # technical|low: 1 row
    row("Please refund the second charge on my card.", "high", "billing", 8),
]
TEST_REQUEST = "My parcel has been stuck at the depot for two weeks now."
VALIDATION = [row("Where can I change my password for the portal?", "medium", "account", 9)]
TEST = [row(TEST_REQUEST, "high", "shipping", 10)]

# What the fake generator says: a paraphrase per (source request, round seed), and the labels
# it gives each paraphrase when asked as the training row asks.
PARAPHRASES = {
    (FIRE, 42): "Last week's charger got hot, melted and began to smoke next to my laptop.",
    (FIRE, 43): TEST_REQUEST,  # a test row's request: must never train
    (SLOW, 42): "Since the update the dashboard\x07 is slow to open each morning.",  # control char
    (SLOW, 43): "Every morning since the update the dashboard loads very slowly.",
}
LABELS = {
    PARAPHRASES[(FIRE, 42)]: '{"urgency": "critical", "category": "product"}',
    PARAPHRASES[(SLOW, 43)]: '{"urgency": "high", "category": "technical"}',  # label drifted
}


def fake_generator(body: dict) -> str:
    messages = body["messages"]
    if messages[0]["role"] == "system":  # the label check: asked as the training row asks
        return LABELS[messages[-1]["content"]]
    request = messages[0]["content"].split("Message: ", 1)[1]
    return PARAPHRASES[(request, body["seed"])]


@pytest.fixture
def splits(project):
    """models/base (the tokenizer the checks count with), three small splits, and the token
    budget validate would have chosen."""
    base_model.main()
    write_jsonl(paths.TRAIN, TRAIN)
    write_jsonl(paths.VALIDATION, VALIDATION)
    write_jsonl(paths.TEST, TEST)
    write_json(paths.MAX_LENGTH, {"max_length": 256})
    return project


def test_off_by_default_writes_empty_outputs(splits):
    augment.main()
    assert paths.SYNTHETIC.read_text() == paths.SYNTHETIC_REJECTED.read_text() == ""
    report = json.loads(paths.stage_report("augment").read_text())
    assert report["enabled"] is False and report["candidates"] == report["kept"] == 0
    assert len(train.training_records("sft")) == len(TRAIN)


def test_rare_strata_get_checked_paraphrases_with_their_provenance(splits, monkeypatch):
    monkeypatch.setenv("AUGMENT_KEY", "sk-augment")
    held_out = {p: md5_path(p) for p in (paths.VALIDATION, paths.TEST)}
    with openai_endpoint(fake_generator) as endpoint:
        generator = {
            "base_url": endpoint.url,
            "model": "fake",
            "api_key_env": "AUGMENT_KEY",
            "timeout": 5,
        }
        set_params(splits, **{"augment.min_rows": 3, "augment.generator": generator})
        augment.main()
    assert endpoint.keys == {"Bearer sk-augment"}  # the key from the environment only
    kept = read_jsonl(paths.SYNTHETIC)
    assert len(kept) == 1
    assert kept[0]["messages"][1]["content"] == PARAPHRASES[(FIRE, 42)]
    # the system prompt and the answer are the source's; the provenance names it
    assert kept[0]["messages"][0] == TRAIN[5]["messages"][0]
    assert kept[0]["messages"][2] == TRAIN[5]["messages"][2]
    assert kept[0]["meta"]["synthetic"] == {
        "generator": "fake",
        "seed": 42,
        "stratum": "product|critical",
        "source": {"id": TRAIN[5]["id"], "file": "data/raw/tickets.jsonl", "line": 6},
        "label_checked": True,
    }
    reasons = {
        r["messages"][1]["content"]: r["reason"] for r in read_jsonl(paths.SYNTHETIC_REJECTED)
    }
    assert reasons == {
        TEST_REQUEST: f"duplicate of test:{TEST[0]['id']}",
        PARAPHRASES[(SLOW, 42)]: "control_chars",  # validate's GX suite
        PARAPHRASES[(SLOW, 43)]: "label_mismatch: {'urgency': 'high'}",
    }
    report = json.loads(paths.stage_report("augment").read_text())
    assert report["by_stratum"] == {
        "product|critical": {
            "before": 1,
            "candidates": 2,
            "kept": 1,
            "rejected": {"duplicate": 1},
            "after": 2,
        },
        "technical|low": {
            "before": 1,
            "candidates": 2,
            "kept": 0,
            "rejected": {"control_chars": 1, "label_mismatch": 1},
            "after": 1,
        },
    }
    assert report["candidates"] == report["kept"] + report["rejected"] == 4
    assert {p: md5_path(p) for p in held_out} == held_out  # validation and test untouched
    assert kept[0] in train.training_records("sft")  # train reads it beside the split


def test_the_base_model_generates_and_a_rerun_gives_the_same_bytes(splits):
    """The tiny (random) base model writes nonsense: every candidate is accounted for, and the
    same seed asks the same."""
    set_params(splits, **{"augment.min_rows": 3, "augment.max_new_tokens": 12})
    augment.main()
    first = paths.SYNTHETIC.read_bytes() + paths.SYNTHETIC_REJECTED.read_bytes()
    report = json.loads(paths.stage_report("augment").read_text())
    assert report["generator"] == "base model" and report["candidates"] == 4
    assert report["kept"] + report["rejected"] == 4
    augment.main()
    assert paths.SYNTHETIC.read_bytes() + paths.SYNTHETIC_REJECTED.read_bytes() == first


def test_bad_settings_stop_with_one_line(splits):
    set_params(
        splits,
        **{
            "augment.min_rows": 3,
            "augment.generator": {
                "base_url": "http://127.0.0.1:9/v1",
                "model": "fake",
                "api_key_env": "NONE",
                "timeout": 1,
            },
        },
    )
    with pytest.raises(StageError, match=r"augment.generator: http://127.0.0.1:9/v1 \(fake\)"):
        augment.main()
    set_params(splits, **{"task.stratify_by": []})
    with pytest.raises(StageError, match="task 'ticket_triage' has none"):
        augment.main()
    set_params(splits, **{"augment.prompt": "Rewrite this."})
    with pytest.raises(StageError, match=r"augment.prompt='Rewrite this.': String should match"):
        augment.main()

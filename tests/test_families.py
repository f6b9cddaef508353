"""Your model: tiny bf16 models wearing the real chat templates of Llama 3.1, Qwen 2.5, Qwen 3,
Gemma 3 and Phi-3 (tests/tiny_model.py) go through the whole pipeline; loss sits on exactly
each answer and its end-of-turn token; validate counts what train trains; bf16 stays bf16."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, copy_template, tiny_overrides
from tiny_model import FAMILIES, build_family_model, ticket_corpus, trained_runs
from transformers import AutoTokenizer

from stages import base_model, dedup, evaluate, export, split, train, validate
from stages.common.examples import IGNORE

SINGLE = [{"role": "system", "content": "Triage."},
          {"role": "user", "content": "Charged twice."},
          {"role": "assistant", "content": '{"urgency": "high", "category": "billing"}'}]
MULTI = [{"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello, how can I help?"},
         {"role": "user", "content": "Charged twice."},
         {"role": "assistant", "content": '{"urgency": "high", "category": "billing"}'}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_project(request, tmp_path_factory):
    """A project whose models/base is the family's tiny model (base_model already ran)."""
    import os

    from stages.common.compose import compose

    family = request.param
    folder = tmp_path_factory.mktemp(family)
    model = build_family_model(folder / "model", ticket_corpus(ROOT / "data/raw/tickets.jsonl"),
                               family)
    root = copy_template(folder / "project")
    cwd = os.getcwd()
    os.chdir(root)
    compose(root / "params.yaml", tiny_overrides(model))
    base_model.main()
    yield family, root
    os.chdir(cwd)


def test_loss_on_exactly_each_answer_and_its_end_of_turn(family_project):
    family, root = family_project
    spec = FAMILIES[family]
    report = json.loads((root / "reports/base_model.json").read_text())
    assert report["training_template"]["exact_check"]
    tokenizer = AutoTokenizer.from_pretrained(root / "models/base")
    end_of_turn = {"llama3_1": "<|eot_id|>", "qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>",
                   "gemma3": "<end_of_turn>", "phi3": "<|end|>"}[family]
    records = [{"source": "t.jsonl", "line": 1, "messages": SINGLE},
               {"source": "t.jsonl", "line": 2, "messages": MULTI}]
    rows = train.tokenized_rows(records, tokenizer, "assistant", None, packing=False)
    for record, row in zip(records, rows):
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        expected = [a + end_of_turn for a in answers]
        # Qwen 3 writes an empty reasoning block into the final turn: the model generates it
        expected[-1] = spec.get("final_turn_prefix", "") + expected[-1]
        assert trained_runs(tokenizer, row) == expected
        # everything else is the prompt, exactly as the model's own template renders it
        shipped = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        assert tokenizer.decode(row["input_ids"]) == shipped


def test_validate_counts_what_train_trains(family_project):
    _, root = family_project
    tokenizer = AutoTokenizer.from_pretrained(root / "models/base")
    template = (root / "models/base/chat_template_training.jinja").read_text()
    weighted = [*MULTI[:1], {**MULTI[1], "weight": 0}, *MULTI[2:]]
    records = [{"source": "t.jsonl", "line": i + 1, "messages": m}
               for i, m in enumerate([SINGLE, MULTI, weighted])]
    records.append({"source": "t.jsonl", "line": 4, "text": "Refunds take five days."})
    for train_on in ("assistant", "all"):
        facts = [{"unknown_role": None, "role_order": None, "n_assistant": 1} for _ in records]
        validate.measure_tokens(facts, records, tokenizer, template, train_on, limit=None)
        rows = train.tokenized_rows(records, tokenizer, train_on, None, packing=False)
        assert [f["n_tokens"] for f in facts] == [len(r["input_ids"]) for r in rows]
        assert [f["trainable_tokens"] for f in facts] == [
            sum(label != IGNORE for label in r["labels"]) for r in rows]


def test_whole_pipeline_keeps_bf16(family_project):
    _, root = family_project
    for stage in (validate, dedup, split, train, export, evaluate):
        stage.main()
    base = json.loads((root / "reports/base_model.json").read_text())
    exported = json.loads((root / "reports/export.json").read_text())
    assert base["dtype"] == "bfloat16" and exported["dtype"] == "bfloat16"
    for folder in ("models/base", "models/merged"):
        config = json.loads((root / folder / "config.json").read_text())
        assert config["dtype"] == "bfloat16", folder
    assert exported["round_trip"]["greedy_answers_match"]
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["tuned"]["test_loss"] > 0 and metrics["n_examples"] > 0

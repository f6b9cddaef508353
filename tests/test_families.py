"""Your model: tiny bf16 models wearing the real chat templates of Llama 3.1, Qwen 2.5, Qwen 3,
Gemma 3 and Phi-3 (tests/tiny_model.py) go through the whole pipeline; loss sits on exactly
each answer and its end-of-turn token; validate counts what train trains; bf16 stays bf16."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, copy_template, declare_dependency, tiny_overrides
from tiny_model import FAMILIES, build_family_model, ticket_corpus, trained_runs
from transformers import AutoTokenizer

from stages import base_model, dedup, evaluate, export, split, train, validate
from stages.common.config import StageError
from stages.common.examples import IGNORE
from stages.common.facts import measure_tokens

SINGLE = [
    {"role": "system", "content": "Triage."},
    {"role": "user", "content": "Charged twice."},
    {"role": "assistant", "content": '{"urgency": "high", "category": "billing"}'},
]
MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Charged twice."},
    {"role": "assistant", "content": '{"urgency": "high", "category": "billing"}'},
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_project(request, tmp_path_factory):
    """A project whose models/base is the family's tiny model (base_model already ran)."""
    import os

    from stages.common.compose import compose

    family = request.param
    folder = tmp_path_factory.mktemp(family)
    model = build_family_model(
        folder / "model", ticket_corpus(ROOT / "data/raw/tickets.jsonl"), family
    )
    root = copy_template(folder / "project")
    cwd = os.getcwd()
    os.chdir(root)
    compose(root / "params.yaml", tiny_overrides(model))
    declare_dependency(root, "base_model", model)
    base_model.main()
    yield family, root
    os.chdir(cwd)


def test_loss_on_exactly_each_answer_and_its_end_of_turn(family_project):
    family, root = family_project
    spec = FAMILIES[family]
    report = json.loads((root / "reports/base_model.json").read_text())
    assert report["training_template"]["exact_check"]
    tokenizer = AutoTokenizer.from_pretrained(root / "models/base")
    end_of_turn = {
        "llama3_1": "<|eot_id|>",
        "qwen2_5": "<|im_end|>",
        "qwen3": "<|im_end|>",
        "gemma3": "<end_of_turn>",
        "phi3": "<|end|>",
    }[family]
    records = [
        {"source": "t.jsonl", "line": 1, "messages": SINGLE},
        {"source": "t.jsonl", "line": 2, "messages": MULTI},
    ]
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
    records = [
        {"source": "t.jsonl", "line": i + 1, "messages": m}
        for i, m in enumerate([SINGLE, MULTI, weighted])
    ]
    records.append({"source": "t.jsonl", "line": 4, "text": "Refunds take five days."})
    for train_on in ("assistant", "all"):
        facts = [{"unknown_role": None, "role_order": None, "n_assistant": 1} for _ in records]
        measure_tokens(facts, records, tokenizer, template, train_on, limit=None)
        rows = train.tokenized_rows(records, tokenizer, train_on, None, packing=False)
        assert [f["n_tokens"] for f in facts] == [len(r["input_ids"]) for r in rows]
        assert [f["trainable_tokens"] for f in facts] == [
            sum(label != IGNORE for label in r["labels"]) for r in rows
        ]


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


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order",
            "description": "Look up an order",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Where is order 42?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_order", "arguments": {"order_id": "42"}}}
        ],
    },
    {"role": "tool", "content": '{"status": "shipped"}'},
    {"role": "assistant", "content": "Order 42 has shipped."},
]
TOOL_FAMILIES = ("llama3_1", "qwen2_5", "qwen3")  # whose chat templates render tools


def test_tool_calls_carry_loss_and_tool_results_do_not(family_project):
    family, root = family_project
    tokenizer = AutoTokenizer.from_pretrained(root / "models/base")
    record = {"source": "t.jsonl", "line": 1, "messages": TOOL_CHAT, "tools": TOOLS}
    if family not in TOOL_FAMILIES:  # no tool support: refused, never trained as empty turns
        with pytest.raises(StageError, match="t.jsonl:1: .*(tool|roles)"):
            train.tokenized_rows([record], tokenizer, "assistant", None, packing=False)
        return
    [row] = train.tokenized_rows([record], tokenizer, "assistant", None, packing=False)
    call, answer = trained_runs(tokenizer, row)
    assert "get_order" in call and "42" in call and "shipped" not in call
    assert answer.endswith("Order 42 has shipped." + FAMILIES[family]["eos"])
    # the tool's result and the declared tools are in the input, never in the labels
    text = tokenizer.decode(row["input_ids"])
    assert "shipped" in text and "Look up an order" in text  # Llama writes the result as JSON


def test_tool_calling_data_from_openai_and_sharegpt_goes_through(family_project):
    family, root = family_project
    if family != "qwen2_5":
        pytest.skip("one tool-capable family is enough for the data path")
    openai_rows = [
        {
            "tools": TOOLS,
            "messages": [
                {"role": "user", "content": f"Where is order {i}?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"c{i}",
                            "type": "function",
                            "function": {
                                "name": "get_order",
                                "arguments": json.dumps({"order_id": str(i)}),
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": f"c{i}", "content": '{"status": "shipped"}'},
                {"role": "assistant", "content": f"Order {i} has shipped."},
            ],
        }
        for i in range(6)
    ]
    bad = [  # reason codes validation gives
        {
            "tools": TOOLS,
            "messages": [
                {"role": "user", "content": "Order 1?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "get_order", "arguments": '{"order_id": '},
                        }
                    ],
                },
            ],
        },  # arguments cut off
        {
            "tools": TOOLS,
            "messages": [
                {"role": "user", "content": "Order 2?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "cancel_order", "arguments": "{}"},
                        }
                    ],
                },
            ],
        },  # not declared
        {
            "tools": TOOLS,
            "messages": [
                {"role": "user", "content": "Order 3?"},
                {"role": "tool", "content": "{}"},  # no call before it
                {"role": "assistant", "content": "Shipped."},
            ],
        },
    ]
    # LLaMA-Factory's ShareGPT form of the glaive set: tools as a JSON string of bare schemas
    glaive = [
        {
            "tools": json.dumps([t["function"] for t in TOOLS]),
            "conversations": [
                {"from": "human", "value": f"Status of order {i}?"},
                {
                    "from": "function_call",
                    "value": json.dumps({"name": "get_order", "arguments": {"order_id": str(i)}}),
                },
                {"from": "observation", "value": '{"status": "delayed"}'},
                {"from": "gpt", "value": f"Order {i} is delayed."},
            ],
        }
        for i in range(6)
    ]
    (root / "data/raw/tools.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in openai_rows + bad)
    )
    (root / "data/raw/glaive.json").write_text(json.dumps(glaive))
    from conftest import set_params

    for path, kind in (("data/raw/tools.jsonl", "messages"), ("data/raw/glaive.json", "auto")):
        set_params(
            root,
            **{
                "data.path": path,
                "data.kind": kind,
                "data.test_path": None,
                "data.max_rejected_fraction": 0.5,
                "task.name": "tool_calling",
                "task.answer_regex": None,
                "task.labels": {},
                "task.stratify_by": [],
            },
        )
        validate.main()
        report = json.loads((root / "reports/validate.json").read_text())
        assert report["rows_out"] == 6, report["quarantined_by_reason"]
        valid = [json.loads(line) for line in (root / "data/interim/valid.jsonl").open()]
        call = valid[0]["messages"][1]["tool_calls"][0]["function"]
        assert call["name"] == "get_order" and isinstance(call["arguments"], dict)
        assert valid[0]["messages"][2]["role"] == "tool"
        assert valid[0]["tools"][0]["type"] == "function"
    set_params(root, **{"data.path": "data/raw/tools.jsonl", "data.kind": "messages"})
    validate.main()
    quarantined = [json.loads(line) for line in (root / "data/interim/quarantine.jsonl").open()]
    assert [q["reasons"] for q in quarantined] == [
        ["tool_arguments_invalid"],
        ["tool_undeclared"],
        ["bad_role_order"],
    ]


def test_tool_calling_trains_and_is_scored_end_to_end(family_project):
    family, root = family_project
    if family != "qwen2_5":
        pytest.skip("one tool-capable family is enough for the stages")
    from conftest import set_params

    def call(i):
        return {
            "type": "function",
            "function": {"name": "get_order", "arguments": json.dumps({"order_id": str(i)})},
        }

    rows = []
    for i in range(40):
        ask = {"role": "user", "content": f"Where is order {i}? I placed it on day {7 * i}."}
        if i % 2:  # ends with the call: the answer to score is the call itself
            rows.append(
                {
                    "tools": TOOLS,
                    "messages": [
                        ask,
                        {"role": "assistant", "content": None, "tool_calls": [call(i)]},
                    ],
                }
            )
        else:  # the call, its result, then the answer in words
            rows.append(
                {
                    "tools": TOOLS,
                    "messages": [
                        ask,
                        {"role": "assistant", "content": None, "tool_calls": [call(i)]},
                        {"role": "tool", "content": '{"status": "shipped"}'},
                        {"role": "assistant", "content": f"Order {i} has shipped."},
                    ],
                }
            )
    (root / "data/raw/tool_orders.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_params(
        root,
        **{
            "data.path": "data/raw/tool_orders.jsonl",
            "data.kind": "messages",
            "data.test_path": None,
            "task.name": "tool_calling",
            "task.answer_regex": None,
            "task.labels": {},
            "task.stratify_by": [],
            "task.metrics": ["tool_calls", "exact_match"],
        },
    )
    for stage in (validate, dedup, split, train, export, evaluate):
        stage.main()
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for name in ("base", "tuned"):
        assert {"tool_name_match", "tool_call_match", "exact_match"} <= set(metrics[name])
    predictions = [json.loads(line) for line in (root / "reports/predictions.jsonl").open()]
    calls = [p for p in predictions if '"name": "get_order"' in p["reference"]]
    assert calls and all("tool_call_match" in p["scores"]["tuned"] for p in predictions)

"""Nothing a user writes crashes validate or is silently ignored.

1. A named defect corpus: each kind of defect a data file can hold, with its outcome: a reason
   code in the quarantine at its file and line, a one-line error naming the file (a file that
   cannot be read at all), or kept (valid input that must not be rejected). Good rows sit
   beside the bad ones and must be kept. One validate run per record kind holds all its rows.
2. Property-based tests: generated records, JSON values and bytes (unicode with lone
   surrogates, huge numbers, NaN, deep nesting, mixed line ends, byte order marks) thrown at
   the readers and at the canonical form and checks: never a traceback, only reason codes or
   one StageError line; every non-blank line or element is one row; rows in = valid +
   quarantined, per file. Derandomized, so CI sees the same examples every run.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
from pathlib import Path

import pytest
from conftest import copy_template, declare_dependency, set_params, tiny_overrides
from helpers import GOOD, GOOD_ROWS, SYSTEM, chat, msgs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages import validate
from stages.common.config import StageError
from stages.common.facts import measure, measure_tokens, special_token_pattern
from stages.common.files import read_jsonl, write_jsonl
from stages.common.kinds import KINDS, kind_of
from stages.common.records import BOM, LINE_ENDS, read_file

KEPT = "kept"

READER_REASONS = {
    "malformed_json",
    "nesting_too_deep",
    "number_too_long",
    "duplicate_key",
    "lone_surrogate",
    "invalid_utf8",
    "nul_byte",
    "malformed_csv",
    "binary_value",
    "unreadable_value",
}
STRUCTURE_REASONS = {
    "not_an_object",
    "missing_field",
    "wrong_type",
    "null_value",
    "empty_conversation",
    "message_missing_key",
    "message_unrecognized_key",
    "bad_weight",
    "tool_arguments_invalid",
    "tool_undeclared",
    "kind_mismatch",
}
RULE_REASONS = {
    "empty_content",
    "control_chars",
    "replacement_char",
    "special_token_leak",
    "unknown_role",
    "bad_role_order",
    "no_assistant",
    "empty_assistant",
    "template_error",
    "zero_trainable_tokens",
    "chosen_equals_rejected",
    "too_long",
    "answer_format",
    "label_outside_set",
}
REASONS = READER_REASONS | STRUCTURE_REASONS | RULE_REASONS


def with_raw(record: dict, key: str, raw_json: str) -> str:
    """A record's JSON line with one more key whose value is raw JSON text (NaN, huge numbers)."""
    return json.dumps(record)[:-1] + f', "{key}": {raw_json}' + "}"


def tools_chat(arguments, tools=("lookup",), **call_extra) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "Where is order 7?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        **call_extra,
                        "function": {"name": "lookup", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "content": "shipped"},
            {"role": "assistant", "content": GOOD},
        ],
        "tools": [{"type": "function", "function": {"name": t, "parameters": {}}} for t in tools],
    }


USER = {"role": "user", "content": "I was charged twice."}
ANSWER = {"role": "assistant", "content": GOOD}
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_ESCAPED = "[" * 990 + '"\\u0041"' + "]" * 990  # parses, then too deep for any walk

# the first row of each file and the last are this good row; defects sit between them

# name, kind, file format, the row (a record, or raw JSON text / bytes / CSV line), outcome
ROW_DEFECTS = [
    # --- JSON Lines syntax and bytes
    (
        "json_truncated_line",
        "messages",
        ".jsonl",
        '{"messages": [{"role": "user", "content": "cut',
        "malformed_json",
    ),
    ("json_trailing_comma", "messages", ".jsonl", '{"messages": [],}', "malformed_json"),
    ("json_single_quotes", "messages", ".jsonl", "{'messages': []}", "malformed_json"),
    ("json_comment_line", "messages", ".jsonl", "// exported by tool X", "malformed_json"),
    (
        "json_two_records_on_one_line",
        "messages",
        ".jsonl",
        json.dumps(chat()) + " " + json.dumps(chat()),
        "malformed_json",
    ),
    ("nbsp_only_line", "messages", ".jsonl", "\u00a0\u00a0", "malformed_json"),
    ("invalid_utf8_byte", "messages", ".jsonl", b'{"messages": "\xff\xfe"}', "invalid_utf8"),
    (
        "latin1_line",
        "messages",
        ".jsonl",
        json.dumps(chat("café")).replace("\\u00e9", "\xe9").encode("latin-1"),
        "invalid_utf8",
    ),
    (
        "utf8_encoded_surrogate",
        "messages",
        ".jsonl",
        b'{"messages": "\xed\xa0\x80"}',
        "invalid_utf8",
    ),
    ("nul_byte_in_line", "messages", ".jsonl", b'{"messages": [\x00]}', "nul_byte"),
    ("json_array_line", "messages", ".jsonl", '["a", "list"]', "not_an_object"),
    ("json_number_line", "messages", ".jsonl", "42", "not_an_object"),
    ("json_null_line", "messages", ".jsonl", "null", "not_an_object"),
    ("json_string_line", "messages", ".jsonl", '"hello"', "not_an_object"),
    (
        "nesting_too_deep_to_parse",
        "messages",
        ".jsonl",
        '{"messages": ' + DEEP + "}",
        "nesting_too_deep",
    ),
    (
        "nesting_deep_with_escape",
        "messages",
        ".jsonl",
        '{"messages": ' + DEEP_ESCAPED + "}",
        "nesting_too_deep",
    ),
    (
        "nesting_200_levels",
        "messages",
        ".jsonl",
        with_raw(chat(), "x", "[" * 200 + "]" * 200),
        "nesting_too_deep",
    ),
    ("number_too_long", "messages", ".jsonl", with_raw(chat(), "n", "9" * 5000), "number_too_long"),
    ("duplicate_key", "messages", ".jsonl", '{"messages": [], "messages": []}', "duplicate_key"),
    (
        "duplicate_key_in_message",
        "messages",
        ".jsonl",
        '{"messages": [{"role": "user", "role": "assistant", "content": "hi"}]}',
        "duplicate_key",
    ),
    (
        "lone_surrogate_escape",
        "messages",
        ".jsonl",
        '{"messages": [{"role": "user", "content": "hi \\ud83d"}]}',
        "lone_surrogate",
    ),
    (
        "lone_surrogate_in_key",
        "messages",
        ".jsonl",
        with_raw(chat(), "\\udc00", "1"),
        "lone_surrogate",
    ),
    (
        "bom_mid_file",
        "messages",
        ".jsonl",
        BOM + json.dumps(chat("Concatenated export.")).encode(),
        KEPT,
    ),
    # --- messages structure
    ("messages_field_missing", "messages", ".jsonl", {"conversation": []}, "missing_field"),
    ("messages_not_a_list", "messages", ".jsonl", {"messages": "hello"}, "wrong_type"),
    ("messages_object_not_list", "messages", ".jsonl", {"messages": USER}, "wrong_type"),
    ("messages_empty", "messages", ".jsonl", {"messages": []}, "empty_conversation"),
    ("messages_null", "messages", ".jsonl", {"messages": None}, "null_value"),
    ("message_null", "messages", ".jsonl", {"messages": [SYSTEM, None]}, "null_value"),
    ("message_not_object", "messages", ".jsonl", {"messages": ["hi", ANSWER]}, "wrong_type"),
    (
        "message_role_missing",
        "messages",
        ".jsonl",
        {"messages": [{"content": "hi"}, ANSWER]},
        "message_missing_key",
    ),
    (
        "message_content_missing",
        "messages",
        ".jsonl",
        {"messages": [{"role": "user"}, ANSWER]},
        "message_missing_key",
    ),
    (
        "message_unknown_key",
        "messages",
        ".jsonl",
        {"messages": [USER | {"mood": "angry"}, ANSWER]},
        "message_unrecognized_key",
    ),
    (
        "messages_role_unknown",
        "messages",
        ".jsonl",
        msgs(("customer", "Hi"), ("assistant", GOOD)),
        "unknown_role",
    ),
    (
        "messages_role_capitalised",
        "messages",
        ".jsonl",
        msgs(("User", "Hi"), ("assistant", GOOD)),
        "unknown_role",
    ),
    (
        "messages_role_number",
        "messages",
        ".jsonl",
        {"messages": [USER | {"role": 1}, ANSWER]},
        "wrong_type",
    ),
    (
        "content_number",
        "messages",
        ".jsonl",
        {"messages": [USER | {"content": 42}, ANSWER]},
        "wrong_type",
    ),
    (
        "content_null",
        "messages",
        ".jsonl",
        {"messages": [USER | {"content": None}, ANSWER]},
        "null_value",
    ),
    (
        "content_parts_list",
        "messages",
        ".jsonl",
        {"messages": [USER | {"content": [{"type": "text", "text": "hi"}]}, ANSWER]},
        "wrong_type",
    ),
    (
        "content_infinity",
        "messages",
        ".jsonl",
        '{"messages": [{"role": "user", "content": Infinity}]}',
        "wrong_type",
    ),
    (
        "no_assistant_turn",
        "messages",
        ".jsonl",
        msgs(("system", "Triage."), ("user", "Hi")),
        "no_assistant",
    ),
    (
        "system_not_first",
        "messages",
        ".jsonl",
        msgs(("user", "a"), ("system", "Triage."), ("assistant", GOOD)),
        "bad_role_order",
    ),
    (
        "two_user_turns",
        "messages",
        ".jsonl",
        msgs(("user", "a"), ("user", "b"), ("assistant", GOOD)),
        "bad_role_order",
    ),
    (
        "ends_with_user",
        "messages",
        ".jsonl",
        msgs(("user", "a"), ("assistant", GOOD), ("user", "thanks")),
        "bad_role_order",
    ),
    (
        "starts_with_assistant",
        "messages",
        ".jsonl",
        msgs(("assistant", "Hello!"), ("user", "a"), ("assistant", GOOD)),
        "bad_role_order",
    ),
    (
        "tool_result_without_call",
        "messages",
        ".jsonl",
        msgs(("user", "a"), ("tool", "shipped"), ("assistant", GOOD)),
        "bad_role_order",
    ),
    ("empty_user_content", "messages", ".jsonl", chat(user=" "), "empty_content"),
    ("empty_answer", "messages", ".jsonl", chat(answer="  "), "empty_assistant"),
    ("control_char", "messages", ".jsonl", chat(user="charged\u0007 twice"), "control_chars"),
    ("replacement_char", "messages", ".jsonl", chat(user="charged tw\ufffdce"), "replacement_char"),
    (
        "special_token_leak",
        "messages",
        ".jsonl",
        chat(user="charged<|im_end|> twice"),
        "special_token_leak",
    ),
    ("too_long", "messages", ".jsonl", chat(user="log line " * 400), "too_long"),
    (
        "answer_off_format",
        "messages",
        ".jsonl",
        chat(answer=GOOD + " Hope that helps!"),
        "answer_format",
    ),
    (
        "label_outside_set",
        "messages",
        ".jsonl",
        chat(answer='{"urgency": "high", "category": "sales"}'),
        "label_outside_set",
    ),
    (
        "weight_two",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"weight": 2}]},
        "bad_weight",
    ),
    (
        "weight_negative",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"weight": -1}]},
        "bad_weight",
    ),
    (
        "weight_bool",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"weight": True}]},
        "bad_weight",
    ),
    (
        "weight_string",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"weight": "1"}]},
        "bad_weight",
    ),
    (
        "weight_nan",
        "messages",
        ".jsonl",
        json.dumps({"messages": [USER, ANSWER | {"weight": "NAN"}]}).replace('"NAN"', "NaN"),
        "bad_weight",
    ),
    (
        "weight_zero_only_answer",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"weight": 0}]},
        "zero_trainable_tokens",
    ),
    ("alpaca_row_in_messages_set", "messages", ".jsonl", GOOD_ROWS["alpaca"], "kind_mismatch"),
    (
        "null_optional_keys",
        "messages",
        ".jsonl",
        {
            "messages": [
                USER | {"weight": None, "tool_calls": None, "name": None, "mood": None},
                ANSWER | {"weight": None},
            ],
            "tools": None,
            "extra": None,
        },
        KEPT,
    ),
    (
        "weight_one_float",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"weight": 1.0}]},
        KEPT,
    ),
    ("nan_in_meta", "messages", ".jsonl", with_raw(chat(), "score", "NaN"), KEPT),
    ("infinity_in_meta", "messages", ".jsonl", with_raw(chat(), "score", "-Infinity"), KEPT),
    ("huge_int_in_meta", "messages", ".jsonl", with_raw(chat(), "n", "9" * 4000), KEPT),
    ("extra_top_level_key", "messages", ".jsonl", chat(source_url="https://example.com"), KEPT),
    ("unicode_astral_and_cjk", "messages", ".jsonl", chat(user="請退款 🙏 twice"), KEPT),
    (
        "escaped_newlines_in_content",
        "messages",
        ".jsonl",
        chat(user="line one\r\nline two\ttab"),
        KEPT,
    ),
    (
        "surrogate_pair_escape",
        "messages",
        ".jsonl",
        json.dumps(chat(user="emoji \U0001f600")),
        KEPT,
    ),  # ensure_ascii writes \ud83d\ude00
    # --- tool calling (the tiny model's template renders no calls: template_error is right)
    (
        "tool_call_template_cannot_render",
        "messages",
        ".jsonl",
        tools_chat({"id": 7}),
        "template_error",
    ),
    (
        "tool_arguments_not_json",
        "messages",
        ".jsonl",
        tools_chat("{id: 7"),
        "tool_arguments_invalid",
    ),
    ("tool_arguments_a_list", "messages", ".jsonl", tools_chat("[7]"), "tool_arguments_invalid"),
    (
        "tool_arguments_too_deep",
        "messages",
        ".jsonl",
        tools_chat("[" * 100_000),
        "tool_arguments_invalid",
    ),
    (
        "tool_arguments_number_too_long",
        "messages",
        ".jsonl",
        tools_chat("9" * 5000),
        "tool_arguments_invalid",
    ),
    (
        "tool_arguments_lone_surrogate",
        "messages",
        ".jsonl",
        tools_chat('{"q": "\\ud800"}'),
        "tool_arguments_invalid",
    ),
    (
        "tool_arguments_duplicate_key",
        "messages",
        ".jsonl",
        tools_chat('{"id": 7, "id": 8}'),
        "tool_arguments_invalid",
    ),
    (
        "tool_undeclared",
        "messages",
        ".jsonl",
        tools_chat({"id": 7}, tools=("other",)),
        "tool_undeclared",
    ),
    ("tool_call_id_number", "messages", ".jsonl", tools_chat({"id": 7}, id=12), "wrong_type"),
    (
        "tool_calls_false",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"tool_calls": False}]},
        "wrong_type",
    ),
    (
        "tool_calls_object",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"tool_calls": {"name": "lookup"}}]},
        "wrong_type",
    ),
    (
        "tool_calls_empty_list",
        "messages",
        ".jsonl",
        {"messages": [USER, ANSWER | {"tool_calls": []}]},
        KEPT,
    ),
    ("tools_not_a_list", "messages", ".jsonl", chat(tools={"name": "lookup"}), "wrong_type"),
    (
        "tool_without_name",
        "messages",
        ".jsonl",
        chat(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "message_missing_key",
    ),
    (
        "tools_json_string_too_deep",
        "messages",
        ".jsonl",
        chat(tools="[" * 100_000),
        "tool_arguments_invalid",
    ),
    # --- ShareGPT in a JSON array
    (
        "sharegpt_unknown_speaker",
        "sharegpt",
        ".json",
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": GOOD}]},
        "unknown_role",
    ),
    (
        "sharegpt_value_missing",
        "sharegpt",
        ".json",
        {"conversations": [{"from": "human"}]},
        "message_missing_key",
    ),
    (
        "sharegpt_conversations_object",
        "sharegpt",
        ".json",
        {"conversations": {"from": "human", "value": "hi"}},
        "wrong_type",
    ),
    (
        "sharegpt_turn_unknown_key",
        "sharegpt",
        ".json",
        {
            "conversations": [
                {"from": "human", "value": "hi", "lang": "en"},
                {"from": "gpt", "value": GOOD},
            ]
        },
        "message_unrecognized_key",
    ),
    (
        "sharegpt_system_number",
        "sharegpt",
        ".json",
        GOOD_ROWS["sharegpt"] | {"system": 3},
        "wrong_type",
    ),
    (
        "sharegpt_gpt_speaks_first",
        "sharegpt",
        ".json",
        {
            "conversations": [
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": GOOD},
            ]
        },
        "bad_role_order",
    ),
    (
        "sharegpt_function_call_not_json",
        "sharegpt",
        ".json",
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "function_call", "value": "lookup(7)"},
            ]
        },
        "tool_arguments_invalid",
    ),
    (
        "sharegpt_function_call_number_too_long",
        "sharegpt",
        ".json",
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "function_call", "value": "9" * 5000},
            ]
        },
        "tool_arguments_invalid",
    ),
    (
        "sharegpt_speaker_capitalised",
        "sharegpt",
        ".json",
        {"conversations": [{"from": "Human", "value": "hi"}, {"from": "GPT", "value": GOOD}]},
        KEPT,
    ),
    (
        "json_element_duplicate_key",
        "sharegpt",
        ".json",
        '{"conversations": [], "conversations": [{"from": "human", "value": "hi"}]}',
        "duplicate_key",
    ),
    (
        "json_element_lone_surrogate",
        "sharegpt",
        ".json",
        '{"conversations": [{"from": "human", "value": "\\udfff"}]}',
        "lone_surrogate",
    ),
    (
        "json_element_deep_with_escape",
        "sharegpt",
        ".json",
        '{"conversations": ' + "[" * 200 + '"\\u0041"' + "]" * 200 + "}",
        "nesting_too_deep",
    ),
    ("json_element_not_object", "sharegpt", ".json", '"a string"', "not_an_object"),
    ("json_element_null", "sharegpt", ".json", "null", "not_an_object"),
    (
        "json_element_nan_in_meta",
        "sharegpt",
        ".json",
        with_raw(GOOD_ROWS["sharegpt"], "s", "NaN"),
        KEPT,
    ),
    # --- Alpaca
    (
        "alpaca_output_missing",
        "alpaca",
        ".jsonl",
        {"instruction": "Triage.", "input": "hi"},
        "missing_field",
    ),
    (
        "alpaca_output_null",
        "alpaca",
        ".jsonl",
        {"instruction": "Triage.", "output": None},
        "null_value",
    ),
    (
        "alpaca_output_number",
        "alpaca",
        ".jsonl",
        {"instruction": "Triage.", "output": 3},
        "wrong_type",
    ),
    ("alpaca_input_zero", "alpaca", ".jsonl", GOOD_ROWS["alpaca"] | {"input": 0}, "wrong_type"),
    (
        "alpaca_history_not_pairs",
        "alpaca",
        ".jsonl",
        GOOD_ROWS["alpaca"] | {"history": ["q"]},
        "wrong_type",
    ),
    (
        "alpaca_history_object",
        "alpaca",
        ".jsonl",
        GOOD_ROWS["alpaca"] | {"history": {}},
        "wrong_type",
    ),
    (
        "alpaca_history_pair_number",
        "alpaca",
        ".jsonl",
        GOOD_ROWS["alpaca"] | {"history": [[1, 2]]},
        "wrong_type",
    ),
    (
        "alpaca_instruction_blank",
        "alpaca",
        ".jsonl",
        {"instruction": "   ", "output": GOOD},
        "empty_content",
    ),
    ("alpaca_input_null", "alpaca", ".jsonl", GOOD_ROWS["alpaca"] | {"input": None}, KEPT),
    ("alpaca_input_empty", "alpaca", ".jsonl", GOOD_ROWS["alpaca"] | {"input": ""}, KEPT),
    ("alpaca_history_null", "alpaca", ".jsonl", GOOD_ROWS["alpaca"] | {"history": None}, KEPT),
    ("alpaca_system_null", "alpaca", ".jsonl", GOOD_ROWS["alpaca"] | {"system": None}, KEPT),
    # --- prompt/completion in CSV (rows as CSV text where the defect is the CSV itself)
    ("csv_row_too_many_fields", "prompt_completion", ".csv", '"hi","a","b"', "malformed_csv"),
    ("csv_row_too_few_fields", "prompt_completion", ".csv", '"only one field"', "malformed_csv"),
    (
        "csv_nul_byte",
        "prompt_completion",
        ".csv",
        '"hi\x00","' + GOOD.replace('"', '""') + '"',
        "nul_byte",
    ),
    (
        "csv_completion_empty",
        "prompt_completion",
        ".csv",
        {"prompt": "hi", "completion": ""},
        "empty_assistant",
    ),
    (
        "csv_prompt_blank",
        "prompt_completion",
        ".csv",
        {"prompt": "  ", "completion": GOOD},
        "empty_content",
    ),
    (
        "csv_completion_off_format",
        "prompt_completion",
        ".csv",
        {"prompt": "hi", "completion": "billing, high"},
        "answer_format",
    ),
    (
        "csv_messages_cell_lone_surrogate",
        "prompt_completion",
        ".csv",
        {"prompt": '[{"role": "user", "content": "\\ud800"}]', "completion": GOOD},
        "lone_surrogate",
    ),
    (
        "csv_messages_cell_too_deep",
        "prompt_completion",
        ".csv",
        {"prompt": "[" * 300 + "]" * 300, "completion": GOOD},
        "nesting_too_deep",
    ),
    (
        "csv_messages_cell_role_unknown",
        "prompt_completion",
        ".csv",
        {"prompt": '[{"role": "customer", "content": "hi"}]', "completion": GOOD},
        "unknown_role",
    ),
    (
        "csv_messages_cell",
        "prompt_completion",
        ".csv",
        {"prompt": json.dumps([USER]), "completion": GOOD},
        KEPT,
    ),
    (
        "csv_cell_with_newlines",
        "prompt_completion",
        ".csv",
        {"prompt": "line one\nline two\r\nline three", "completion": GOOD},
        KEPT,
    ),
    (
        "csv_duplicate_key_answer_stays_text",
        "prompt_completion",
        ".csv",
        {"prompt": "hi", "completion": '{"a": 1, "a": 2}'},
        "answer_format",
    ),
    # --- preference
    (
        "chosen_equals_rejected",
        "preference",
        ".jsonl",
        {"prompt": "hi", "chosen": GOOD, "rejected": GOOD},
        "chosen_equals_rejected",
    ),
    (
        "rejected_blank",
        "preference",
        ".jsonl",
        {"prompt": "hi", "chosen": GOOD, "rejected": " "},
        "empty_assistant",
    ),
    (
        "preference_no_prompt_no_shared_prefix",
        "preference",
        ".jsonl",
        {
            "chosen": [{"role": "user", "content": "a"}],
            "rejected": [{"role": "user", "content": "b"}],
        },
        "missing_field",
    ),
    (
        "chosen_user_role",
        "preference",
        ".jsonl",
        {"prompt": "hi", "chosen": [USER], "rejected": "billing"},
        "bad_role_order",
    ),
    (
        "chosen_only_repeats_prompt",
        "preference",
        ".jsonl",
        {"prompt": "I was charged twice.", "chosen": [USER], "rejected": [USER]},
        "empty_conversation",
    ),
    (
        "chosen_null",
        "preference",
        ".jsonl",
        {"prompt": "hi", "chosen": None, "rejected": GOOD},
        "null_value",
    ),
    (
        "chosen_number",
        "preference",
        ".jsonl",
        {"prompt": "hi", "chosen": 1, "rejected": GOOD},
        "wrong_type",
    ),
    (
        "preference_prompt_empty_list",
        "preference",
        ".jsonl",
        {"prompt": [], "chosen": GOOD, "rejected": "billing!"},
        "empty_conversation",
    ),
    (
        "preference_null_system",
        "preference",
        ".jsonl",
        GOOD_ROWS["preference"] | {"system": None},
        KEPT,
    ),
    # --- raw text
    ("text_blank", "text", ".jsonl", {"text": "  \n "}, "empty_content"),
    ("text_null", "text", ".jsonl", {"text": None}, "null_value"),
    ("text_number", "text", ".jsonl", {"text": 12}, "wrong_type"),
    ("text_control_char", "text", ".jsonl", {"text": "page\x0cbreak"}, "control_chars"),
    ("text_special_token", "text", ".jsonl", {"text": "end<|endoftext|>"}, "special_token_leak"),
    ("text_long_document_kept", "text", ".jsonl", {"text": "Refunds take five days. " * 500}, KEPT),
]


def parquet(**columns):
    """A Parquet file writer of typed columns: parquet(text=(pa_type, values), ...)."""

    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {}
        for name, (kind, values) in columns.items():
            if kind == "utf8_view":  # bytes declared as strings: not all of them are UTF-8
                arrays[name] = pa.array(values, pa.binary()).view(pa.string())
            else:
                arrays[name] = pa.array(values, kind() if callable(kind) else kind)
        pq.write_table(pa.table(arrays), path)

    return write


def _pa(name: str, *args):
    import pyarrow as pa

    return lambda: getattr(pa, name)(*args)


def utf16(text: str, codec: str) -> bytes:
    return ("\ufeff" + text).encode(codec)


def lines(*records, end="\n") -> str:
    return end.join(json.dumps(r) for r in records) + end


TEXT_A, TEXT_B = GOOD_ROWS["text"], {"text": "Passwords reset by email."}
CHAT_A, CHAT_B = chat(), chat("My parcel is late.")


def _duplicate_columns(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), path
    )


class Error(str):
    """A whole-file outcome: StageError, one line matching this pattern."""


# name, kind, file name, content (bytes, or a function that writes the file), outcome:
# {line: outcome} for the rows of a readable file, or Error(pattern) for one that is not
FILE_DEFECTS = [
    (
        "utf8_bom_file",
        "messages",
        "bom.jsonl",
        BOM + lines(CHAT_A, CHAT_B).encode(),
        {1: KEPT, 2: KEPT},
    ),
    (
        "utf16_bom_file",
        "messages",
        "utf16le.jsonl",
        utf16(lines(CHAT_A, CHAT_B), "utf-16-le"),
        {1: KEPT, 2: KEPT},
    ),
    (
        "utf16_big_endian_bom_file",
        "messages",
        "utf16be.jsonl",
        utf16(lines(CHAT_A, {"messages": []}), "utf-16-be"),
        {1: KEPT, 2: "empty_conversation"},
    ),
    (
        "crlf_line_ends",
        "messages",
        "crlf.jsonl",
        lines(CHAT_A, CHAT_B, end="\r\n").encode(),
        {1: KEPT, 2: KEPT},
    ),
    (
        "cr_only_line_ends",
        "messages",
        "cr.jsonl",
        lines(CHAT_A, {"messages": 1}, CHAT_B, end="\r").encode(),
        {1: KEPT, 2: "wrong_type", 3: KEPT},
    ),
    (
        "mixed_line_ends",
        "messages",
        "mixed.jsonl",
        (
            json.dumps(CHAT_A)
            + "\r\n"
            + json.dumps(CHAT_B)
            + "\r"
            + "{"
            + "\n"
            + json.dumps(CHAT_A)
        ).encode(),
        {1: KEPT, 2: KEPT, 3: "malformed_json", 4: KEPT},
    ),
    (
        "blank_lines_keep_numbering",
        "messages",
        "blanks.jsonl",
        (
            "\n  \n" + json.dumps(CHAT_A) + "\n\t\n\n" + json.dumps({"messages": None}) + "\n\n"
        ).encode(),
        {3: KEPT, 6: "null_value"},
    ),
    (
        "json_array_cr_line_ends",
        "messages",
        "cr.json",
        ("[\r" + json.dumps(CHAT_A) + ",\r\r" + json.dumps({"messages": 5}) + "\r]").encode(),
        {2: KEPT, 4: "wrong_type"},
    ),
    (
        "json_array_pretty_printed",
        "messages",
        "pretty.json",
        json.dumps([CHAT_A, {"messages": []}], indent=2).encode(),
        {2: KEPT, 2 + len(json.dumps(CHAT_A, indent=2).splitlines()): "empty_conversation"},
    ),
    (
        "csv_bom_and_crlf",
        "messages",
        "bom.csv",
        BOM
        + b'messages\r\n"'
        + json.dumps(CHAT_A["messages"]).replace('"', '""').encode()
        + b'"\r\n"[]"\r\n',
        {2: KEPT, 3: "empty_conversation"},
    ),
    (
        "csv_multiline_cell_numbering",
        "prompt_completion",
        "multiline.csv",
        (
            'prompt,completion\n"first\nsecond\nthird","'
            + GOOD.replace('"', '""')
            + '"\n'
            + '"hi",""\n'
        ).encode(),
        {2: KEPT, 5: "empty_assistant"},
    ),
    (
        "csv_unclosed_quote",
        "prompt_completion",
        "unclosed.csv",
        ('prompt,completion\nhi,"' + GOOD.replace('"', '""') + '"\n"never closed,x\n').encode(),
        {2: KEPT, 3: "malformed_csv"},
    ),
    (
        "parquet_binary_cell",
        "text",
        "binary.parquet",
        parquet(
            text=(_pa("string"), ["a scanned page", "ok page"]),
            blob=(_pa("binary"), [b"\x00\x01", None]),
        ),
        {1: "binary_value", 2: KEPT},
    ),
    (
        "parquet_invalid_utf8_string",
        "text",
        "latin1.parquet",
        parquet(text=("utf8_view", [b"fine text", b"caf\xe9"])),
        {1: KEPT, 2: "invalid_utf8"},
    ),
    (
        "parquet_date_out_of_range",
        "text",
        "dates.parquet",
        parquet(text=(_pa("string"), ["a", "b"]), day=(_pa("date32"), [0, 2**30])),
        {1: KEPT, 2: "unreadable_value"},
    ),
    (
        "parquet_map_of_binary",
        "text",
        "map.parquet",
        parquet(
            text=(_pa("string"), ["a", "b"]),
            tags=(_pa("map_", _pa("string")(), _pa("binary")()), [[("k", b"\x00")], None]),
        ),
        {1: "binary_value", 2: KEPT},
    ),
    (
        "parquet_null_text",
        "text",
        "nulls.parquet",
        parquet(
            text=(_pa("string"), [None, "b"]),
            ts=(_pa("timestamp", "us"), [datetime.datetime(2024, 1, 1), None]),
        ),
        {1: "null_value", 2: KEPT},
    ),
    (
        "parquet_list_of_structs",
        "messages",
        "structs.parquet",
        parquet(messages=(None, [CHAT_A["messages"], [{"role": "user", "content": "x"}]])),
        {1: KEPT, 2: "no_assistant"},
    ),
    # files that cannot be read at all: one line naming the file
    (
        "binary_file",
        "messages",
        "bin.jsonl",
        b"\x00\x01\x02\x03" * 100,
        Error(r"bin.jsonl: looks like a binary file"),
    ),
    (
        "utf16_without_bom",
        "messages",
        "nobom.jsonl",
        lines(CHAT_A).encode("utf-16-le"),
        Error(r"nobom.jsonl: looks like UTF-16 text without a byte order mark"),
    ),
    (
        "utf16_bom_broken",
        "messages",
        "broken16.jsonl",
        b"\xff\xfe{\x00\n",
        Error(r"broken16.jsonl: starts as UTF-16 but is not"),
    ),
    (
        "json_object_not_array",
        "messages",
        "obj.json",
        json.dumps(CHAT_A).encode(),
        Error(r"obj.json: a .json data file must hold an array of records, found an object"),
    ),
    (
        "json_scalar_document",
        "messages",
        "scalar.json",
        b'"records"',
        Error(r"scalar.json: a .json data file must hold an array"),
    ),
    (
        "json_trailing_comma_file",
        "messages",
        "comma.json",
        ("[" + json.dumps(CHAT_A) + ",\n]").encode(),
        Error(r"comma.json:2:1: not a valid JSON"),
    ),
    ("json_empty_file", "messages", "empty.json", b"", Error(r"empty.json:1:1: not a valid JSON")),
    (
        "json_not_utf8",
        "messages",
        "latin1.json",
        '[{"text": "caf\xe9"}]'.encode("latin-1"),
        Error(r"latin1.json: not UTF-8 text"),
    ),
    (
        "json_number_too_long_file",
        "messages",
        "big.json",
        b"[" + b"9" * 5000 + b"]",
        Error(r"big.json: not a readable JSON document \(Exceeds the limit"),
    ),
    (
        "json_too_deep_file",
        "messages",
        "deep.json",
        ("[" + DEEP + "]").encode(),
        Error(r"deep.json: not a readable JSON document \(nested too deep"),
    ),
    (
        "csv_not_utf8",
        "prompt_completion",
        "latin1.csv",
        "prompt,completion\ncaf\xe9,x\n".encode("latin-1"),
        Error(r"latin1.csv: not UTF-8 text"),
    ),
    (
        "csv_duplicate_header",
        "prompt_completion",
        "dup.csv",
        b"prompt,prompt\na,b\n",
        Error(r"dup.csv:1: CSV header needs unique, non-empty column names"),
    ),
    (
        "csv_empty_column_name",
        "prompt_completion",
        "blankcol.csv",
        b"prompt,,completion\na,b,c\n",
        Error(r"blankcol.csv:1: CSV header needs unique, non-empty column names"),
    ),
    (
        "parquet_not_parquet",
        "text",
        "fake.parquet",
        b"PAR1 not really",
        Error(r"fake.parquet: not a readable Parquet file"),
    ),
    (
        "parquet_duplicate_columns",
        "text",
        "dupcols.parquet",
        _duplicate_columns,
        Error(r"dupcols.parquet: not a readable Parquet file"),
    ),
    (
        "unsupported_suffix",
        "text",
        "notes.txt",
        b"hello",
        Error(r"notes.txt: unsupported file type"),
    ),
    (
        "kind_not_detectable",
        "auto",
        "odd.jsonl",
        b'{"question": "a", "answer": "b"}\n',
        Error(r"odd.jsonl: cannot tell the record kind"),
    ),
    (
        "only_blank_lines",
        "messages",
        "blank.jsonl",
        b"\n \r\n\t\n",
        Error(r"blank.jsonl: no records"),
    ),
]


NAMES = [case[0] for case in ROW_DEFECTS + FILE_DEFECTS]
assert len(NAMES) == len(set(NAMES)), "each defect kind has one name"


# --- writing rows into files ----------------------------------------------------------------


def encode_rows(suffix: str, rows: list) -> tuple[bytes, list[int]]:
    """A file of rows (records, raw JSON text or bytes, raw CSV lines) and the line of each."""
    if suffix == ".jsonl":
        parts = [
            r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            for r in rows
        ]
        return b"\n".join(parts) + b"\n", list(range(1, len(rows) + 1))
    if suffix == ".json":
        parts = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        return ("[\n" + ",\n".join(parts) + "\n]\n").encode(), list(range(2, len(rows) + 2))
    columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    out, numbers, line = io.StringIO(newline=""), [], 2
    csv.writer(out, lineterminator="\n").writerow(columns)
    for r in rows:
        if isinstance(r, str):
            text = r + "\n"
        else:
            cell = io.StringIO(newline="")
            csv.writer(cell, lineterminator="\n").writerow(
                [v if isinstance(v := r.get(c, ""), str) else json.dumps(v) for c in columns]
            )
            text = cell.getvalue()
        out.write(text)
        numbers.append(line)
        line += text.count("\n")
    return out.getvalue().encode("utf-8"), numbers


class Outcome:
    def __init__(self, root: Path):
        self.report = json.loads((root / "reports/validate.json").read_text())
        self.valid = {(r["source"], r["line"]): r for r in read_jsonl(root / validate.VALID)}
        self.quarantine = {
            (q["source"], q["line"]): q for q in read_jsonl(root / validate.QUARANTINE)
        }
        self.lines: dict[str, list[int]] = {}

    def check(self, source: str, line: int, expected: str) -> None:
        entry = self.quarantine.get((source, line))
        if expected == KEPT:
            assert (source, line) in self.valid, f"{source}:{line} not kept: {entry}"
            return
        assert entry is not None, f"{source}:{line} not quarantined (expected {expected})"
        assert expected in entry["reasons"], (source, line, expected, entry)
        assert set(entry["reasons"]) <= REASONS, entry["reasons"]


def validate_files(root: Path, kind: str, files: dict[str, bytes | object]) -> None:
    paths = []
    for name, content in files.items():
        path = root / "data/raw" / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        paths.append(f"data/raw/{name}")
    set_params(root, **{"data.path": paths, "data.kind": kind})
    validate.main()


# --- the prepared project, and one validate run per record kind ------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    """A project with the tiny model's tokenizer in models/base; cwd is its root."""
    from stages import base_model
    from stages.common.compose import compose

    root = copy_template(tmp_path_factory.mktemp("defects") / "project", raw_rows=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        compose(root / "params.yaml", tiny_overrides(tiny_model_dir))
        declare_dependency(root, "base_model", tiny_model_dir)
        base_model.main()
        for old in (root / "data/raw").iterdir():
            old.unlink()
        set_params(
            root,
            **{"data.max_rejected_fraction": 1.0, "train.max_length": 128, "data.test_path": None},
        )
        yield root


@pytest.fixture(scope="module")
def kind_runs(prepared):
    """kind -> Outcome of one validate run over all that kind's files of the corpus."""
    cache: dict[str, Outcome] = {}

    def run(kind: str) -> Outcome:
        if kind in cache:
            return cache[kind]
        files, numbers = {}, {}
        for suffix in (".jsonl", ".json", ".csv"):
            rows = [c[3] for c in ROW_DEFECTS if c[1] == kind and c[2] == suffix]
            if rows:
                name = f"{kind}_rows{suffix}"
                files[name], numbers[f"data/raw/{name}"] = encode_rows(
                    suffix, [GOOD_ROWS[kind], *rows, GOOD_ROWS[kind]]
                )
        for _, case_kind, name, content, expected in FILE_DEFECTS:
            if case_kind == kind and not isinstance(expected, Error):
                files[name] = content
        validate_files(prepared, kind, files)
        outcome = cache[kind] = Outcome(prepared)
        outcome.lines = numbers
        # counts reconcile per file: every row is kept or quarantined, none lost
        sources = [r["source"] for r in outcome.valid.values()] + [
            q["source"] for q in outcome.quarantine.values()
        ]
        for source, rows_in in outcome.report["files"].items():
            assert rows_in == sources.count(source), (source, rows_in, outcome.report)
            if source in numbers:
                assert rows_in == len(numbers[source]), source
        return outcome

    return run


@pytest.mark.parametrize(
    "name, kind, suffix, row, expected", ROW_DEFECTS, ids=[c[0] for c in ROW_DEFECTS]
)
def test_row_defect(kind_runs, name, kind, suffix, row, expected):
    outcome = kind_runs(kind)
    source = f"data/raw/{kind}_rows{suffix}"
    numbers = outcome.lines[source]
    index = [c[0] for c in ROW_DEFECTS if c[1] == kind and c[2] == suffix].index(name)
    outcome.check(source, numbers[1 + index], expected)
    # the good rows at the start and the end of the file are kept, whatever lies between
    outcome.check(source, numbers[0], KEPT)
    outcome.check(source, numbers[-1], KEPT)


@pytest.mark.parametrize(
    "name, kind, file, content, expected", FILE_DEFECTS, ids=[c[0] for c in FILE_DEFECTS]
)
def test_file_defect(prepared, kind_runs, name, kind, file, content, expected):
    if isinstance(expected, Error):
        with pytest.raises(StageError, match=expected) as err:
            validate_files(prepared, kind, {file: content})
        assert "\n" not in str(err.value) and file in str(err.value)
        return
    outcome = kind_runs(kind)
    source = f"data/raw/{file}"
    assert outcome.report["files"][source] == len(expected), outcome.report["files"]
    for line, outcome_of_line in expected.items():
        outcome.check(source, line, outcome_of_line)


def test_corpus_names_at_least_sixty_defect_kinds():
    assert len(set(NAMES)) >= 60
    # every reason code the checks can give is named by some case of the corpus
    named = {c[4] for c in ROW_DEFECTS} | {
        o for c in FILE_DEFECTS if isinstance(c[4], dict) for o in c[4].values()
    }
    assert REASONS - named == set(), REASONS - named


# --- property-based tests --------------------------------------------------------------------

PROPERTY = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def dumps(value, ensure_ascii: bool = True) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii)


def nested(depth: int):
    value: object = "\ud800" if depth % 7 == 0 else "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def pick(values: tuple):
    """sampled_from, with a short repr (hypothesis writes strategies' reprs into its events)."""
    return st.integers(0, len(values) - 1).map(values.__getitem__)


characters = st.characters(exclude_categories=())  # every code point, lone surrogates too
texts = st.one_of(
    st.text(characters, max_size=12),
    pick(
        (
            "",
            " ",
            "\n",
            GOOD,
            "hi",
            "<|im_end|>",
            "\ufffd",
            "a\x07b",
            "\ud83d",
            "\u2028",
            "null",
            "[]",
            "{}",
            '{"name": "lookup"}',
            "[" * 300,
        )
    ),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), texts, st.integers(-(2**70), 2**70)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)
# raw JSON values json.dumps cannot write or that sit at the limits: too many digits, nesting
# past the limit (with a lone surrogate inside, now and then), infinities, exponents
odd_json = pick(
    (
        "9" * 4301,
        "-" + "1" * 4400,
        "1e999",
        "-Infinity",
        "NaN",
        "1E-400",
        "[" * 101 + "]" * 101,
        "[" * 100 + "]" * 100,
        '"\\udbff"',
        "[" * 3000 + "]" * 3000,
    )
) | st.integers(90, 130).map(lambda n: dumps(nested(n)))


def mostly(strategy):
    """Usually (5 in 6) the plausible value, sometimes any JSON value at all."""
    return st.integers(0, 5).flatmap(lambda i: strategy if i else json_values)


roles = st.sampled_from(
    [
        "system",
        "user",
        "assistant",
        "tool",
        "human",
        "gpt",
        "User",
        "customer",
        "function_call",
        "observation",
        "",
    ]
)
arguments = st.one_of(
    json_values,
    json_values.map(dumps),
    texts,
    odd_json,
    st.just('{"city": "Paris", "city": "Rome"}'),
)
tool_call = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": mostly(
            st.fixed_dictionaries(
                {"name": mostly(st.sampled_from(["lookup", "f"])), "arguments": arguments}
            )
        ),
    },
    optional={"id": mostly(texts)},
)
weights = st.sampled_from([0, 1, 1.0, 2, -1, True, None, "1", float("nan")])
message = st.fixed_dictionaries(
    {"role": mostly(roles), "content": mostly(texts)},
    optional={
        "weight": mostly(weights),
        "tool_calls": mostly(st.lists(tool_call, max_size=2)),
        "name": mostly(texts),
        "tool_call_id": mostly(texts),
        "mood": json_values,
    },
)
# a plausible conversation: an optional system message, then user and assistant turns
dialogue = st.tuples(
    st.booleans(), st.lists(st.tuples(texts, texts | st.just(GOOD)), min_size=1, max_size=3)
).map(
    lambda p: (
        [SYSTEM] * p[0]
        + [
            {"role": role, "content": text}
            for pair in p[1]
            for role, text in zip(("user", "assistant"), pair)
        ]
    )
)
messages = mostly(st.lists(message, max_size=4) | dialogue)
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": mostly(
                st.fixed_dictionaries(
                    {"name": mostly(st.sampled_from(["lookup", "f"]))},
                    optional={"parameters": json_values},
                )
            ),
        }
    ),
    max_size=2,
)
tools = mostly(tools) | tools.map(dumps)
turn = st.fixed_dictionaries(
    {"from": mostly(roles), "value": mostly(texts | arguments)},
    optional={"weight": mostly(weights), "lang": json_values},
)
conversations = mostly(st.lists(turn, max_size=4))
reply = mostly(texts | messages | message | turn)
extra = st.dictionaries(texts, json_values, max_size=2)
# a plausible tool-calling conversation whose call's arguments (a JSON string, a value, odd
# JSON) and the tools it declares vary
tool_records = st.tuples(
    arguments, pick(("lookup", "f")), st.lists(pick(("lookup", "f")), max_size=2), st.booleans()
).map(lambda p: tools_chat(p[0], tools=p[2], **({"id": p[1]} if p[3] else {})))
RECORDS = {
    "messages": st.fixed_dictionaries({"messages": messages}, optional={"tools": tools})
    | tool_records,
    "sharegpt": st.fixed_dictionaries(
        {"conversations": conversations}, optional={"system": mostly(texts), "tools": tools}
    ),
    "alpaca": st.fixed_dictionaries(
        {"instruction": mostly(texts), "output": mostly(texts)},
        optional={
            "input": mostly(texts),
            "system": mostly(texts),
            "history": mostly(st.lists(st.lists(mostly(texts), max_size=3), max_size=2)),
        },
    ),
    "prompt_completion": st.fixed_dictionaries({"prompt": reply, "completion": reply}),
    "preference": st.fixed_dictionaries(
        {"chosen": reply, "rejected": reply},
        optional={"prompt": reply, "conversations": conversations, "system": mostly(texts)},
    ),
    "text": st.fixed_dictionaries({"text": mostly(texts)}),
}
records = st.one_of(
    *[st.tuples(s, extra).map(lambda p: {**p[1], **p[0]}) for s in RECORDS.values()], json_values
)


def cut(text: str, at: int) -> str:
    return text[: at % (len(text) + 1)]


def inject(record, raw: str) -> str:
    """A record's JSON with one more value written as raw JSON text (odd_json)."""
    text = dumps(record)
    if isinstance(record, dict):
        return text[:-1] + (", " if record else "") + f'"odd": {raw}' + "}"
    return f"[{raw}, {text}]" if isinstance(record, list) else raw


# one line of a JSONL file: a record as JSON (escaped, or raw UTF-8 with surrogates left as
# they are), with an odd value, cut short, with a NUL inside, or any bytes at all
jsonl_line = st.one_of(
    records.map(lambda r: dumps(r).encode()),
    records.map(lambda r: dumps(r).encode()),
    st.tuples(records, odd_json).map(lambda p: inject(*p).encode()),
    records.map(lambda r: dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.tuples(records, st.integers(0, 200)).map(lambda p: cut(dumps(p[0]), p[1]).encode()),
    records.map(lambda r: dumps(r).encode().replace(b":", b":\x00", 1)),
    st.binary(max_size=40),
)
line_end = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b"\n \n"])


@st.composite
def jsonl_files(draw, line=jsonl_line) -> bytes:
    body = b"".join(draw(line) + draw(line_end) for _ in range(draw(st.integers(0, 8))))
    body = body[:-1] if body and draw(st.booleans()) else body  # no final line end
    return (BOM if draw(st.booleans()) else b"") + body


def expected_lines(data: bytes) -> list[int]:
    """The non-blank lines of a JSON Lines file: each must come back as exactly one row."""
    return [
        n for n, raw in enumerate(LINE_ENDS.split(data), start=1) if raw.removeprefix(BOM).strip()
    ]


@pytest.fixture(scope="module")
def checker(prepared, tmp_path_factory):
    """check(path) reads a file and takes every row through the canonical form, the per-row
    checks, the token counts and the output writer, asserting the invariants on the way."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared / "models/base")
    template = (prepared / validate.TRAINING_TEMPLATE).read_text()
    leak = special_token_pattern(tokenizer)
    out = tmp_path_factory.mktemp("outputs") / "out.jsonl"

    def check(path: Path, declared: str | None = None) -> list[dict] | None:
        try:
            rows = read_file(path)
        except StageError as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            return None
        # in file order (a JSON array may hold several records on one line)
        assert [r["line"] for r in rows] == sorted(r["line"] for r in rows)
        converted = []
        for row in rows:
            assert row["source"] == str(path) and row["line"] >= 1
            if row["parse_error"]:
                assert row["parse_error"] in READER_REASONS and isinstance(row["raw"], str)
                assert row["obj"] is None
            kind = declared or kind_of(row["obj"]) or "messages"
            record, reason, _ = validate.to_record(row, kind)
            assert (record is None) == (reason is not None)
            assert reason is None or reason in READER_REASONS | STRUCTURE_REASONS, reason
            converted.append((row, record, reason))
        records = [record for _, record, _ in converted]
        facts = [
            {"structure_error": reason, **measure(record, leak)} for _, record, reason in converted
        ]
        measure_tokens(facts, records, tokenizer, template, "assistant", 128)
        # what validate writes: valid records, and quarantined rows with their raw text
        write_jsonl(
            out,
            [
                record
                or {
                    "source": row["source"],
                    "line": row["line"],
                    "reasons": [reason],
                    "record": row["obj"],
                    **({"raw": row["raw"]} if "raw" in row else {}),
                }
                for row, record, reason in converted
            ],
        )
        assert len(read_jsonl(out)) == len(rows)
        return rows

    return check


@settings(PROPERTY, max_examples=800)
@given(data=jsonl_files(), declared=st.sampled_from([None, *KINDS]))
def test_jsonl_reader_and_checks_never_crash(checker, tmp_path_factory, data, declared):
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_bytes(data)
    rows = checker(path, declared)
    if rows is not None:
        assert [r["line"] for r in rows] == expected_lines(data)


@settings(PROPERTY, max_examples=400)
@given(
    data=jsonl_files(
        line=records.map(lambda r: dumps(r).encode())
        | st.tuples(records, odd_json).map(lambda p: inject(*p).encode())
    )
)
def test_json_records_are_each_one_row(checker, tmp_path_factory, data):
    """Lines that are all JSON records: nothing is lost, whatever the records hold."""
    path = tmp_path_factory.getbasetemp() / "records.jsonl"
    path.write_bytes(data)
    rows = checker(path)
    assert rows is not None and [r["line"] for r in rows] == expected_lines(data)


json_ws = st.sampled_from(["", " ", "\n", "\r\n", "\r", "\t"])


@settings(PROPERTY, max_examples=400)
@given(
    elements=st.lists(
        st.one_of(
            records.map(dumps),
            json_values.map(dumps),
            st.tuples(records, odd_json).map(lambda p: inject(*p)),
            st.text(characters, max_size=8),
        ),
        max_size=6,
    ),
    spaces=st.lists(json_ws, min_size=8, max_size=8),
    bom=st.booleans(),
    codec=st.sampled_from(["utf-8", "utf-8", "utf-16"]),
)
def test_json_array_reader_never_crashes(checker, tmp_path_factory, elements, spaces, bom, codec):
    text, starts = "[" + spaces[0], []
    for i, element in enumerate(elements):
        text += ("," + spaces[1]) if i else ""
        starts.append(len(re.findall(r"\r\n|\r|\n", text)) + 1)  # the line it starts on
        text += element + spaces[(i + 2) % 8]
    text += "]"
    data = (("\ufeff" if bom else "") + text).encode(codec, "surrogatepass")
    path = tmp_path_factory.getbasetemp() / "fuzz.json"
    path.write_bytes(data)
    rows = checker(path)
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # not a JSON document (or a number too long, too
        parsed = None  # deep): a one-line error
    if rows is not None and codec == "utf-8":
        assert parsed is not None and len(rows) == len(parsed)
        if len(parsed) == len(elements):  # each generated element is one element
            assert [r["line"] for r in rows] == starts


cells = st.one_of(texts, json_values.map(dumps), messages.map(dumps), st.just(""))


@settings(PROPERTY, max_examples=400)
@given(
    header=st.lists(
        st.sampled_from(["prompt", "completion", "text", "messages", "x", ""]),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    table=st.lists(st.lists(cells, min_size=0, max_size=4), max_size=6),
    raw=st.binary(max_size=30),
    end=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
)
def test_csv_reader_never_crashes(checker, tmp_path_factory, header, table, raw, end, bom):
    out = io.StringIO(newline="")
    # every cell quoted: csv does not quote a bare LF when rows end in CR, which reads back
    # as two rows, rightly
    writer = csv.writer(out, lineterminator=end, quoting=csv.QUOTE_ALL)
    writer.writerow(header)
    writer.writerows(table)
    data = (BOM if bom else b"") + out.getvalue().encode("utf-8", "surrogatepass")
    path = tmp_path_factory.getbasetemp() / "fuzz.csv"
    for content in (data, data + raw):
        path.write_bytes(content)
        rows = checker(path)
        if content is data and rows is not None and "\x00" not in out.getvalue():
            # every written row with a non-blank cell is one row
            written = [r for r in table if any(c.strip() for c in r)]
            assert len(rows) == len(written), (rows, written)


@st.composite
def parquet_tables(draw):
    import pyarrow as pa

    columns = {}
    for name in draw(
        st.lists(
            st.sampled_from(
                ["text", "messages", "prompt", "completion", "chosen", "rejected", "meta"]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        )
    ):
        n = 3
        kind = draw(
            st.sampled_from(
                ["string", "bad_utf8", "binary", "int", "float", "messages", "date", "map", "list"]
            )
        )
        plain = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
        if kind == "string":
            columns[name] = pa.array(draw(st.lists(plain | st.none(), min_size=n, max_size=n)))
        elif kind == "bad_utf8":
            columns[name] = pa.array(
                draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n)), pa.binary()
            ).view(pa.string())
        elif kind == "binary":
            columns[name] = pa.array(
                draw(st.lists(st.binary(max_size=4) | st.none(), min_size=n, max_size=n)),
                pa.binary(),
            )
        elif kind == "int":
            columns[name] = pa.array(
                draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n)), pa.int64()
            )
        elif kind == "float":
            columns[name] = pa.array(draw(st.lists(st.floats(), min_size=n, max_size=n)))
        elif kind == "date":
            columns[name] = pa.array(
                draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=n, max_size=n)),
                pa.date32(),
            )
        elif kind == "map":
            columns[name] = pa.array(
                draw(
                    st.lists(
                        st.lists(st.tuples(plain, st.binary(max_size=3)), max_size=2),
                        min_size=n,
                        max_size=n,
                    )
                ),
                pa.map_(pa.string(), pa.binary()),
            )
        elif kind == "list":
            columns[name] = pa.array(
                draw(st.lists(st.lists(plain, max_size=3) | st.none(), min_size=n, max_size=n))
            )
        else:
            message_type = pa.struct([("role", pa.string()), ("content", pa.string())])
            columns[name] = pa.array(
                draw(
                    st.lists(
                        st.lists(
                            st.fixed_dictionaries(
                                {
                                    "role": st.sampled_from(["user", "assistant", "x"]),
                                    "content": plain | st.none(),
                                }
                            ),
                            max_size=3,
                        ),
                        min_size=n,
                        max_size=n,
                    )
                ),
                pa.list_(message_type),
            )
    return pa.table(columns)


@settings(PROPERTY, max_examples=150)
@given(table=parquet_tables(), declared=st.sampled_from([None, *KINDS]))
def test_parquet_reader_never_crashes(checker, tmp_path_factory, table, declared):
    import pyarrow.parquet as pq

    path = tmp_path_factory.getbasetemp() / "fuzz.parquet"
    pq.write_table(table, path)
    rows = checker(path, declared)
    assert rows is not None and len(rows) == table.num_rows


@settings(PROPERTY, max_examples=10)
@given(
    kind=st.sampled_from(KINDS),
    jsonl=jsonl_files(),
    elements=st.lists(st.one_of(*RECORDS.values()).map(dumps), max_size=5),
)
def test_validate_counts_reconcile_per_file(prepared, kind, jsonl, elements):
    """The whole stage, suite and outputs included, on generated files of one kind."""
    files = {"fuzz.jsonl": jsonl, "fuzz.json": ("[" + ",\n".join(elements) + "]").encode()}
    expected = {
        "data/raw/fuzz.jsonl": len(expected_lines(jsonl)),
        "data/raw/fuzz.json": len(elements),
    }
    try:
        validate_files(prepared, kind, files)
    except StageError as err:  # a whole-file defect (binary bytes, no records): one line
        assert "\n" not in str(err) and re.search(r"fuzz\.jsonl?|no records", str(err)), str(err)
        return
    outcome = Outcome(prepared)
    assert outcome.report["files"] == expected
    for source, rows_in in expected.items():
        kept = sum(s == source for s, _ in outcome.valid)
        quarantined = sum(s == source for s, _ in outcome.quarantine)
        assert rows_in == kept + quarantined, (source, outcome.report)
    for entry in outcome.quarantine.values():
        assert entry["reasons"] and set(entry["reasons"]) <= REASONS, entry

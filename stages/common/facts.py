"""The per-row facts validate's Great Expectations suite checks (stages/common/expectations.py):
roles and their order, empty turns, control characters, U+FFFD, leaked special tokens, token
lengths and trainable tokens as training counts them, and the answer's label fields. Validate
measures every raw row with them, and augment every synthetic row, so both pass the same suite.
"""

from __future__ import annotations

import re

from stages.common.examples import ExampleError, record_examples, trainable_tokens, truncate
from stages.common.kinds import ROLES, conversation_text
from stages.common.task import Task

CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, LF and CR are fine


def role_order_error(messages: list[dict]) -> str | None:
    """An optional system message first, then user and assistant turns alternating, from the
    user to the assistant; an assistant turn that calls tools is followed by their results
    (role tool), then by the assistant again."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        return "system message not first"
    if not body or body[-1]["role"] != "assistant":
        return "does not end with an assistant message"
    allowed = {"user"}
    for m in body:
        if m["role"] not in allowed:
            if "tool" in (m["role"], *allowed):
                return "tool results must follow the assistant message that calls the tools"
            return "user and assistant turns do not alternate"
        allowed = {
            "user": {"assistant"},
            "tool": {"tool", "assistant"},
            "assistant": {"tool"} if m.get("tool_calls") else {"user"},
        }[m["role"]]
    return None


def measure(record: dict | None, special_tokens: re.Pattern | None) -> dict:
    """Per-row facts; None where a fact does not apply (a row that failed to parse)."""
    facts = {
        "unknown_role": None,
        "role_order": None,
        "n_assistant": None,
        "empty_content": None,
        "empty_answer": None,
        "control_chars": None,
        "replacement_char": None,
        "special_token": None,
        "chosen_equals_rejected": None,
        "answer": None,
    }
    if record is None:
        return facts
    messages = conversation_text(record)
    contents = [m["content"] for m in messages]
    facts["control_chars"] = any(CONTROL_CHARS.search(c) for c in contents)
    facts["replacement_char"] = any("\ufffd" in c for c in contents)
    if special_tokens is not None:
        leaked = next((m.group(0) for c in contents for m in [special_tokens.search(c)] if m), None)
        facts["special_token"] = leaked
    if "text" in record:
        facts["empty_content"] = not record["text"].strip()
        return facts
    if "messages" in record:
        dialogue, answers = record["messages"], [record["messages"][-1]]
    else:  # preference: the prompt, then each answer must be a proper assistant turn
        dialogue = [*record["prompt"], *record["chosen"]]
        answers = [record["chosen"][-1], record["rejected"][-1]]
        facts["chosen_equals_rejected"] = record["chosen"] == record["rejected"]
        for reply in (record["chosen"], record["rejected"]):
            unknown = [m["role"] for m in reply if m["role"] != "assistant"]
            if unknown:
                facts["role_order"] = "chosen/rejected must be assistant messages"
    roles = [m["role"] for m in dialogue]
    unknown = [r for r in roles if r not in ROLES]
    facts["unknown_role"] = unknown[0] if unknown else None
    facts["n_assistant"] = roles.count("assistant")
    # order is moot without an assistant turn or with a role nobody knows: those codes say it
    if facts["n_assistant"] and not unknown:
        facts["role_order"] = facts["role_order"] or role_order_error(dialogue)
    # a turn that calls tools may have no text
    facts["empty_content"] = any(
        not m["content"].strip() and not m.get("tool_calls") for m in dialogue[:-1]
    )
    facts["empty_answer"] = any(
        not a["content"].strip() and not a.get("tool_calls") for a in answers
    )
    if answers[0]["role"] == "assistant" and answers[0]["content"].strip():
        facts["answer"] = answers[0]["content"]  # an empty one is empty_assistant, not off-format
    return facts


def measure_tokens(
    facts: list[dict],
    records: list[dict | None],
    tokenizer,
    template: str,
    train_on: str,
    limit: int | None,
) -> None:
    """n_tokens (the whole record) and trainable_tokens (within `limit` when rows are cut
    there) of each row, counted by the examples training builds (stages/common/examples.py);
    a record the training template refuses gets its reason as template_error."""
    measured = [r for r in records if r is not None]
    examples = iter(record_examples(tokenizer, measured, template, train_on, collect_errors=True))
    for f, record in zip(facts, records):
        example = next(examples) if record is not None else None
        f["template_error"] = None
        if isinstance(example, ExampleError):
            # a conversation of unknown roles or broken order already has its reason
            if not (f["unknown_role"] or f["role_order"] or f["n_assistant"] == 0):
                f["template_error"] = str(example)
            example = None
        f["n_tokens"] = len(example["input_ids"]) if example else None
        # raw text is packed into windows for pre-training: every token trains, none is cut
        cut = None if record is None or "text" in record else limit
        f["trainable_tokens"] = (
            trainable_tokens(truncate(example, cut)) if example and f["n_assistant"] != 0 else None
        )


def special_token_pattern(tokenizer) -> re.Pattern | None:
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens |= set(tokenizer.all_special_tokens)
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def label_columns(facts: list[dict], task: Task) -> None:
    """label_<field> of each row: the task's label fields of its answer (None without one)."""
    for f in facts:
        fields = task.parse(f["answer"]) if f["answer"] is not None else None
        for name in task.labels:
            f[f"label_{name}"] = (fields or {}).get(name) if f["answer"] is not None else None


def fact_table(facts: list[dict]):
    import pandas as pd

    return pd.DataFrame(facts).astype(object)  # keep None (not NaN) in every column

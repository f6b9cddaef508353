"""Record kinds: detect them from the fields, and turn each raw object into its canonical form.

Three canonical shapes come out, whatever went in (one JSONL record per line, plus `id`,
`source`, `line` and `kind`, the kind it was read as):

    chat        {"messages": [{"role": ..., "content": ..., "weight"?: 0|1}, ...], "tools"?: [...]}
                from messages (OpenAI), sharegpt (conversations/from/value),
                alpaca (instruction/input/output) and prompt_completion (plain or conversational)
                Tool calling, in the shape chat templates render (transformers' convention):
                "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
                an assistant message's "tool_calls": [{"type": "function", "function": {"name",
                "arguments": {...}}, "id"?}] (arguments parsed from JSON), and {"role": "tool",
                "content": result, "tool_call_id"?, "name"?} messages. From OpenAI messages
                (tools, tool_calls, tool) and ShareGPT's function_call / observation turns with
                `tools` as a list or a JSON string (LLaMA-Factory's format of the glaive set).
    preference  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                from prompt/chosen/rejected (plain, conversational or with an implicit prompt)
                and ShareGPT-style rows (conversations + chosen/rejected messages)
    text        {"text": "..."} for continued pre-training

Top-level keys a kind does not use are kept under `meta`, so nothing is lost. A row that does
not fit its kind raises `RowError(reason, detail)`; validation quarantines it with that reason.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, get_args

from stages.common.config import StageError
from stages.common.records import normalize_text, parse_json
from stages.common.schema import RecordKind

KINDS = get_args(RecordKind)  # data.kind's values (the schema is their one home)
SHAPE = {
    "messages": "chat",
    "sharegpt": "chat",
    "alpaca": "chat",
    "prompt_completion": "chat",
    "preference": "preference",
    "text": "text",
}
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "weight", "tool_calls", "tool_call_id", "name"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
# the fields a kind reads; anything else at the top level goes to `meta`
FIELDS = {
    "messages": {"messages", "tools"},
    "sharegpt": {"conversations", "system", "tools"},
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "prompt_completion": {"prompt", "completion"},
    "preference": {"prompt", "chosen", "rejected", "conversations", "system"},
    "text": {"text"},
}


class RowError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def kind_of(obj: Any) -> str | None:
    """The kind a row's fields say it is, or None. Order matters: a ShareGPT preference row has
    `conversations` too, and preference rows may carry a `prompt`."""
    if not isinstance(obj, dict):
        return None
    keys = obj.keys()
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    for kind, required in (
        ("messages", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction", "output"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("text", {"text"}),
    ):
        if required <= keys:
            return kind
    return None


def detect_kind(objects: list[Any]) -> tuple[str | None, Counter]:
    """The most common kind among a file's rows, and the count of each."""
    counts = Counter(k for k in map(kind_of, objects) if k)
    return (counts.most_common(1)[0][0] if counts else None), counts


def _string(value: Any, where: str) -> str:
    if value is None:
        raise RowError("null_value", f"{where} is null")
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{where} is {type(value).__name__}, not a string")
    return value


def _required(obj: dict, key: str) -> Any:
    if key not in obj:
        raise RowError("missing_field", f"no '{key}'")
    return obj[key]


def _conversation(value: Any, where: str) -> list:
    if value is None:
        raise RowError("null_value", f"{where} is null")
    if not isinstance(value, list):
        raise RowError("wrong_type", f"{where} is {type(value).__name__}, not a list")
    if not value:
        raise RowError("empty_conversation", f"{where} is empty")
    return value


def chat_messages(value: Any, where: str = "messages") -> list[dict]:
    """OpenAI-style messages, checked for shape (roles and order are checked by validation)."""
    out = []
    for i, m in enumerate(_conversation(value, where)):
        if m is None:
            raise RowError("null_value", f"{where}[{i}] is null")
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{where}[{i}] is {type(m).__name__}, not an object")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise RowError("message_missing_key", f"{where}[{i}] has no {missing[0]!r}")
        # a key present as null is absent (Parquet and `datasets` exports write every key)
        extra = sorted(k for k in set(m) - MESSAGE_KEYS if m[k] is not None)
        if extra:
            raise RowError("message_unrecognized_key", f"{where}[{i}] has {extra[0]!r}")
        role = _string(m["role"], f"{where}[{i}].role")
        content = m["content"]
        if content is None and m.get("tool_calls"):  # OpenAI: a call with no text is null
            content = ""
        message = {"role": role, "content": _string(content, f"{where}[{i}].content")}
        if m.get("tool_calls") not in (None, []):  # false, "" or {} is a mistake, not "none"
            message["tool_calls"] = [
                tool_call(c, f"{where}[{i}].tool_calls[{k}]")
                for k, c in enumerate(_conversation(m["tool_calls"], f"{where}[{i}].tool_calls"))
            ]
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                message[key] = _string(m[key], f"{where}[{i}].{key}")
        if m.get("weight") is not None:
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise RowError("bad_weight", f"{where}[{i}].weight is {m['weight']!r}, not 0 or 1")
            message["weight"] = int(m["weight"])
        out.append(message)
    return out


def sharegpt_messages(value: Any, where: str = "conversations") -> list[dict]:
    """ShareGPT turns ({from, value}) as chat messages, checked like them."""
    out = []
    for i, turn in enumerate(_conversation(value, where)):
        if not isinstance(turn, dict):
            raise RowError(
                "wrong_type" if turn is not None else "null_value", f"{where}[{i}] is not an object"
            )
        missing = [k for k in ("from", "value") if k not in turn]
        if missing:
            raise RowError("message_missing_key", f"{where}[{i}] has no {missing[0]!r}")
        extra = sorted(k for k in set(turn) - {"from", "value", "weight"} if turn[k] is not None)
        if extra:
            raise RowError("message_unrecognized_key", f"{where}[{i}] has {extra[0]!r}")
        source = _string(turn["from"], f"{where}[{i}].from")
        value = _string(turn["value"], f"{where}[{i}].value")
        if source.lower() == "function_call":  # the assistant calls: a JSON call or a list
            calls = _json(value, f"{where}[{i}].value")
            message = {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    tool_call(c, f"{where}[{i}].value")
                    for c in (calls if isinstance(calls, list) else [calls])
                ],
            }
        elif source.lower() == "observation":  # what the tool returned
            message = {"role": "tool", "content": value}
        else:
            # unknown speakers keep their name: validation quarantines them as unknown_role
            # instead of guessing
            message = {"role": SHAREGPT_ROLES.get(source.lower(), source), "content": value}
        if turn.get("weight") is not None:
            message["weight"] = turn["weight"]
        out.append(message)
    return chat_messages(out, where)


def _json(value: Any, where: str) -> Any:
    """A JSON string inside a record (tool arguments, tools), checked as strictly as a line."""
    if not isinstance(value, str):
        return value
    parsed, error = parse_json(value)
    if error:
        raise RowError("tool_arguments_invalid", f"{where} is not usable JSON ({error})")
    return parsed


def tool_call(call: Any, where: str) -> dict:
    """One call as chat templates render it: {"type": "function", "function": {"name",
    "arguments": {...}}}, from OpenAI's shape (arguments a JSON string) or a bare
    {"name", "arguments"} (ShareGPT's function_call value)."""
    if not isinstance(call, dict):
        raise RowError("wrong_type", f"{where} is not an object")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RowError("message_missing_key", f"{where} has no function name")
    arguments = _json(
        function.get("arguments", function.get("parameters", {})), f"{where}.arguments"
    )
    if not isinstance(arguments, dict):
        raise RowError("tool_arguments_invalid", f"{where}.arguments is not a JSON object")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = _string(call["id"], f"{where}.id")
    return out


def tool_schemas(value: Any) -> list[dict]:
    """Declared tools as [{"type": "function", "function": {...}}]: OpenAI's list, a list of
    bare function schemas, or either as a JSON string."""
    tools = _json(value, "tools")
    if tools in (None, "", []):
        return []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("wrong_type", "tools is not a list of tool schemas")
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError("message_missing_key", f"tools[{k}] has no function name")
        out.append({"type": "function", "function": function})
    return out


def with_tools(obj: dict, fields: dict) -> dict:
    """The record's declared tools beside its messages; every call must name one of them."""
    tools = tool_schemas(obj.get("tools"))
    declared = {t["function"]["name"] for t in tools}
    for i, m in enumerate(fields["messages"]):
        for call in m.get("tool_calls", []):
            if call["function"]["name"] not in declared:
                raise RowError(
                    "tool_undeclared",
                    f"messages[{i}] calls "
                    f"{call['function']['name']!r}, not among the declared tools "
                    f"{sorted(declared)}",
                )
    return fields | ({"tools": tools} if tools else {})


def _with_system(obj: dict, messages: list[dict]) -> list[dict]:
    if obj.get("system") is None:
        return messages
    return [{"role": "system", "content": _string(obj["system"], "system")}, *messages]


def _turns(value: Any, role: str, where: str) -> list[dict]:
    """A plain string becomes one message of `role`; a list is conversational messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):  # a single message object (ShareGPT-style preference)
        return (
            sharegpt_messages([value], where) if "from" in value else chat_messages([value], where)
        )
    return chat_messages(value, where)


def to_chat(kind: str, obj: dict) -> dict:
    if kind == "messages":
        return with_tools(obj, {"messages": chat_messages(_required(obj, "messages"))})
    if kind == "sharegpt":
        return with_tools(
            obj, {"messages": _with_system(obj, sharegpt_messages(_required(obj, "conversations")))}
        )
    if kind == "alpaca":
        instruction = _string(_required(obj, "instruction"), "instruction")
        extra_input = "" if obj.get("input") is None else _string(obj["input"], "input")
        output = _string(_required(obj, "output"), "output")
        if not isinstance(obj.get("history", []), (list, type(None))):
            raise RowError(
                "wrong_type",
                f"history is {type(obj['history']).__name__}, "
                f"not a list of [question, answer] pairs",
            )
        history = []
        for i, pair in enumerate(obj.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise RowError("wrong_type", f"history[{i}] is not a [question, answer] pair")
            history += [
                {"role": "user", "content": _string(pair[0], f"history[{i}][0]")},
                {"role": "assistant", "content": _string(pair[1], f"history[{i}][1]")},
            ]
        user = instruction + ("\n\n" + extra_input if extra_input.strip() else "")
        return {
            "messages": _with_system(
                obj,
                [
                    *history,
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": output},
                ],
            )
        }
    if kind == "prompt_completion":
        prompt = _turns(_required(obj, "prompt"), "user", "prompt")
        completion = _turns(_required(obj, "completion"), "assistant", "completion")
        return {"messages": prompt + completion}
    raise ValueError(kind)


def to_preference(obj: dict) -> dict:
    chosen = _turns(_required(obj, "chosen"), "assistant", "chosen")
    rejected = _turns(_required(obj, "rejected"), "assistant", "rejected")
    if "conversations" in obj:  # ShareGPT style: the conversation is the prompt
        prompt = _with_system(obj, sharegpt_messages(obj["conversations"]))
    elif "prompt" in obj:
        prompt = _with_system(obj, _turns(obj["prompt"], "user", "prompt"))
        # some sets (UltraFeedback) repeat the prompt, with or without its system message,
        # at the start of both conversations: strip it
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            shared = next(
                (n for n in (len(prompt), len(prompt) - 1) if n > 0 and reply[:n] == prompt[-n:]), 0
            )
            if shared == len(reply):
                raise RowError("empty_conversation", f"{name} repeats the prompt, with no answer")
            del reply[:shared]
    else:  # implicit prompt: the shared start of both conversations
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise RowError("missing_field", "no 'prompt' and chosen/rejected share no prefix")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def canonical(kind: str, obj: Any) -> tuple[dict, dict]:
    """(the kind's canonical fields, the unused top-level fields) of one raw object."""
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"a JSON {type(obj).__name__}, not an object")
    if kind == "preference":
        fields = to_preference(obj)
    elif kind == "text":
        fields = {"text": _string(_required(obj, "text"), "text")}
    else:
        fields = to_chat(kind, obj)
    meta = {k: v for k, v in obj.items() if k not in FIELDS[kind] and v is not None}
    return fields, meta


def conversation_text(record: dict) -> list[dict]:
    """All messages of a canonical record (chat or preference), for per-message checks."""
    if "messages" in record:
        return record["messages"]
    if "prompt" in record:
        return [*record["prompt"], *record["chosen"], *record["rejected"]]
    return [{"role": "text", "content": record["text"]}]


def prompt_of(record: dict) -> list[dict]:
    """What the model is given: everything before the final answer."""
    if "messages" in record:
        return record["messages"][:-1]
    return record.get("prompt", [])


def answer_of(record: dict) -> str:
    """The answer the model should give (the chosen one for preference; the text for text).
    A final answer that calls tools is its text followed by the calls as one JSON list of
    {"name", "arguments"} (what the tool_calls metric compares)."""
    if "messages" in record:
        last = record["messages"][-1]
        calls = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in last.get("tool_calls", [])
        ]
        return last["content"] + (json.dumps(calls, sort_keys=True) if calls else "")
    if "chosen" in record:
        return "\n".join(m["content"] for m in record["chosen"])
    return record["text"]


def request_text(record: dict) -> str:
    """What makes two records "the same request", normalised: the prompt without its system
    message (one instruction shared by a whole task would make every pair look alike), or the
    whole text of a raw-text record."""
    if "text" in record:
        return normalize_text(record["text"])
    return normalize_text(
        " \n".join(m["content"] for m in prompt_of(record) if m["role"] != "system")
    )


def answer_key(record: dict) -> str:
    """What must agree among copies of one request: the answer (for preference, the pair)."""
    if "text" in record:
        return ""
    if "chosen" in record:
        return normalize_text(json.dumps([record["chosen"], record["rejected"]]))
    return normalize_text(answer_of(record))


def rename_fields(obj: Any, columns: dict[str, str]) -> Any:
    """Apply `data.columns` ({our field: their field}) to one raw object."""
    if not columns or not isinstance(obj, dict):
        return obj
    renamed = dict(obj)
    for ours, theirs in columns.items():
        if theirs in renamed and ours != theirs:
            renamed[ours] = renamed.pop(theirs)
    return renamed


def training_system_prompt(path: Path) -> tuple[str | None, int, int]:
    """(the most common first system turn of the training records, its count, the records).
    A record without one counts as None: when those are the most, no prompt is added."""
    if not path.exists():
        raise StageError(
            f"{path} not found: the system prompt the model was trained with is "
            "read from it (run `make repro`, or set serve.add_system_prompt=false)"
        )
    counts: Counter[str | None] = Counter()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise StageError(f"{path} line {number}: not JSON") from None
            turns = record.get("messages") or record.get("prompt") or [{}]  # chat / preference
            first = turns[0] if isinstance(turns, list) and isinstance(turns[0], dict) else {}
            counts[first.get("content") if first.get("role") == "system" else None] += 1
    if not counts:
        return None, 0, 0
    prompt, count = counts.most_common(1)[0]
    return prompt, count, sum(counts.values())

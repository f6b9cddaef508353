"""Tool calls: does the answer call the same tools with the same arguments as the reference?

Calls are read out of the text the way the common chat formats write them: every JSON object
with a "name" and "arguments" (or "parameters", Llama 3.x) key, alone, in a list, or wrapped in
tags such as Qwen's and Hermes' <tool_call>...</tool_call>. The reference is the record's final
assistant turn as validate canonicalised it (its text, then its calls as one JSON list).
Per example: tool_name_match (the same multiset of tool names) and tool_call_match (the same
names with equal arguments, compared as parsed JSON). An answer that should call nothing
matches when it calls nothing.
"""

import contextlib
import json

import datasets
import evaluate


def calls_in(text: str) -> list[tuple[str, str]]:
    """(name, arguments as canonical JSON) of each call written in the text, sorted."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while starts := [i for i in (text.find("{", at), text.find("[", at)) if i >= 0]:
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            at = start + 1
            continue
        for item in value if isinstance(value, list) else [value]:
            if (
                isinstance(item, dict)
                and "name" in item
                and ("arguments" in item or "parameters" in item)
            ):
                arguments = item.get("arguments", item.get("parameters"))
                if isinstance(arguments, str):
                    with contextlib.suppress(json.JSONDecodeError):
                        arguments = json.loads(arguments)
                found.append((str(item["name"]), json.dumps(arguments, sort_keys=True)))
        at = end
    return sorted(found)


class ToolCalls(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of answers calling the reference's tools (by name; by name and "
            "arguments).",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        pairs = [(calls_in(p), calls_in(r)) for p, r in zip(predictions, references)]
        names = [float(sorted(n for n, _ in p) == sorted(n for n, _ in r)) for p, r in pairs]
        calls = [float(p == r) for p, r in pairs]
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {
            "tool_name_match": mean(names),
            "tool_call_match": mean(calls),
            "per_example": {"tool_name_match": names, "tool_call_match": calls},
        }

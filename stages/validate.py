"""Stage validate: check every raw record with a Great Expectations suite; quarantine the rest.

Reads `data.path` (file, glob or list), measures each row (structure, roles, answer format,
labels, token length with the base model's tokenizer and chat template), then runs one GX
expectation per rule over that table. Each failing row goes to the quarantine file with all its
reason codes and its source file and line; the others go on as canonical records.

Outputs: data/interim/valid.jsonl, data/interim/quarantine.jsonl, reports/validate.json.
Gate: the stage fails when the rejected fraction exceeds `data.max_rejected_fraction`, or when
any reason listed in `data.fatal_reasons` occurs.
"""

from __future__ import annotations

import re

from collections import Counter
from pathlib import Path

from stages.common import tracking
from stages.common.config import StageError, load_params, run_stage
from stages.common.files import md5_path, write_json, write_jsonl
from stages.common.records import ROLES, read_raw, record_id, resolve_paths
from stages.common.task import Task

VALID = Path("data/interim/valid.jsonl")
QUARANTINE = Path("data/interim/quarantine.jsonl")
REPORT = Path("reports/validate.json")
TOKENIZER_DIR = Path("models/base")


def measure(obj) -> dict:
    """Per-row facts the expectations check; None where a fact does not apply."""
    facts = {"parse_error": None, "missing_key": None, "unknown_role": None, "role_order": None,
             "empty_content": None, "n_assistant": None, "answer": None}
    if not isinstance(obj, dict):
        facts["parse_error"] = "not_an_object"
        return facts
    messages = obj.get("messages")
    if messages is None:
        facts["parse_error"] = "missing_messages"
        return facts
    if not isinstance(messages, list) or not messages:
        facts["parse_error"] = "messages_not_a_list"
        return facts
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
            m.get("content"), str
        ):
            facts["missing_key"] = f"message {i} needs string 'role' and 'content'"
            return facts
    roles = [m["role"] for m in messages]
    unknown = [r for r in roles if r not in ROLES]
    facts["unknown_role"] = unknown[0] if unknown else None
    facts["n_assistant"] = roles.count("assistant")
    facts["role_order"] = role_order_error(roles)
    facts["empty_content"] = any(not m["content"].strip() for m in messages[:-1])
    if roles[-1] == "assistant":
        facts["answer"] = messages[-1]["content"]
    return facts


def role_order_error(roles: list[str]) -> str | None:
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return "system message not first"
    if not body or body[-1] != "assistant":
        return "does not end with an assistant message"
    for i, role in enumerate(body):
        if role != ("user" if i % 2 == 0 else "assistant"):
            return "user and assistant turns do not alternate"
    return None


def build_suite(gx, gxe, task: Task, max_length: int):
    """The expectations, each paired with the reason code its failing rows get."""
    rules = [
        (gxe.ExpectColumnValuesToBeNull(column="parse_error"), None),  # reason = the value
        (gxe.ExpectColumnValuesToBeNull(column="missing_key"), "message_missing_key"),
        (gxe.ExpectColumnValuesToBeNull(column="unknown_role"), "unknown_role"),
        (gxe.ExpectColumnValuesToBeBetween(column="n_assistant", min_value=1), "no_assistant"),
        (gxe.ExpectColumnValuesToBeNull(column="role_order"), "bad_role_order"),
        (gxe.ExpectColumnValuesToBeInSet(column="empty_content", value_set=[False]), "empty_content"),
        (gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=r"\S"), "empty_assistant"),
        (gxe.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=max_length), "too_long"),
    ]
    if task.answer_regex:
        # GX searches (pandas str.contains); anchor it so the whole answer must match, as
        # the metrics demand. Named groups become non-capturing: GX only needs yes/no.
        whole = r"^\s*(?:" + re.sub(r"\(\?P<\w+>", "(?:", task.answer_regex) + r")\s*$"
        rules.append((gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=whole),
                      "answer_format"))
    for name, allowed in task.labels.items():
        rules.append((gxe.ExpectColumnValuesToBeInSet(column=f"label_{name}", value_set=allowed),
                      "label_outside_set"))
    return gx.ExpectationSuite(name="raw_records", expectations=[e for e, _ in rules]), rules


def run_suite(frame, task: Task, max_length: int) -> tuple[dict[int, list[str]], dict]:
    """Row index -> reason codes, plus a per-expectation summary."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("raw").add_dataframe_asset("records")
             .add_batch_definition_whole_dataframe("all"))
    suite, rules = build_suite(gx, gxe, task, max_length)
    suite = context.suites.add(suite)
    # results come back in another order: match them to rules by the expectation's id
    reasons = {e.id: reason for e, reason in zip(suite.expectations, (r for _, r in rules))}
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="raw_records", data=batch, suite=suite))
    result = definition.run(batch_parameters={"dataframe": frame},
                            result_format={"result_format": "COMPLETE"})
    failures: dict[int, list[str]] = {}
    summary = {}
    for res in result.results:
        cfg = res.expectation_config
        indexes = res.result.get("unexpected_index_list") or []
        name = f"{cfg.type}({cfg.kwargs.get('column')})"
        summary[name] = {"reason": reasons[cfg.id] or "parse_error",
                         "success": bool(res.success), "unexpected": len(indexes)}
        for index in indexes:
            index = int(index["index"] if isinstance(index, dict) else index)
            reason = reasons[cfg.id] or frame.at[index, "parse_error"]
            failures.setdefault(index, [])
            if reason not in failures[index]:
                failures[index].append(reason)
    return failures, summary


def token_lengths(rows: list[dict], facts: list[dict]) -> list[int | None]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    lengths: list[int | None] = []
    for row, f in zip(rows, facts):
        ok = f["parse_error"] is None and f["missing_key"] is None and f["unknown_role"] is None
        if not ok:
            lengths.append(None)
            continue
        text = tokenizer.apply_chat_template(row["obj"]["messages"], tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def main() -> None:
    import pandas as pd

    params = load_params()
    data, task = params["data"], Task.from_params(params)
    max_length = int(params["train"]["max_length"])
    if data["kind"] not in ("messages", "auto"):
        raise StageError(f"data.kind={data['kind']}: this version reads chat 'messages' records")
    paths = resolve_paths(data["path"])
    inputs = {f"raw/{p.name}": md5_path(p) for p in paths}

    with tracking.stage_run("validate", params, ["data", "task", "train"], inputs) as run:
        rows = read_raw(paths)
        if not rows:
            raise StageError(f"{', '.join(map(str, paths))}: no records")
        facts = [measure(r["obj"]) if r["parse_error"] is None else
                 {**measure(None), "parse_error": r["parse_error"]} for r in rows]
        lengths = token_lengths(rows, facts)
        for f, n in zip(facts, lengths):
            f["n_tokens"] = n
            fields = task.parse(f["answer"]) if f["answer"] else None
            for name in task.labels:
                f[f"label_{name}"] = (fields or {}).get(name)
        frame = pd.DataFrame(facts).astype(object)  # keep None (not NaN) in every column
        failures, summary = run_suite(frame, task, max_length)

        valid, quarantined = [], []
        for i, row in enumerate(rows):
            if i in failures:
                quarantined.append({"source": row["source"], "line": row["line"],
                                    "reasons": failures[i], "record": row["obj"],
                                    **({"raw": row["raw"]} if "raw" in row else {})})
            else:
                messages = [{"role": m["role"], "content": m["content"]}
                            for m in row["obj"]["messages"]]
                valid.append({"id": record_id(messages), "source": row["source"],
                              "line": row["line"], "messages": messages})
        write_jsonl(VALID, valid)
        write_jsonl(QUARANTINE, quarantined)

        by_reason = Counter(r for q in quarantined for r in q["reasons"])
        balance = Counter(task.stratum(v["messages"][-1]["content"]) for v in valid)
        valid_lengths = [lengths[i] for i in range(len(rows)) if i not in failures]
        report = {
            "rows_in": len(rows),
            "rows_out": len(valid),
            "rows_quarantined": len(quarantined),
            "pass_rate": round(len(valid) / len(rows), 4),
            "quarantined_by_reason": dict(sorted(by_reason.items())),
            "token_length": percentiles([n for n in valid_lengths if n is not None]),
            "max_length": max_length,
            "class_balance": dict(sorted(balance.items())),
            "expectations": summary,
            "files": [str(p) for p in paths],
        }
        assert report["rows_in"] == report["rows_out"] + report["rows_quarantined"]
        write_json(REPORT, report)
        run.summary.update({"validate/rows_in": len(rows), "validate/rows_out": len(valid),
                            "validate/pass_rate": report["pass_rate"],
                            **{f"validate/quarantined/{k}": v for k, v in by_reason.items()}})
        print(f"validate: {len(rows)} rows in, {len(valid)} valid, {len(quarantined)} quarantined "
              f"{dict(by_reason)}")

        rejected = len(quarantined) / len(rows)
        fatal = [r for r in data.get("fatal_reasons") or [] if by_reason.get(r)]
        if rejected > float(data["max_rejected_fraction"]) or fatal:
            top = ", ".join(f"{r} ({n}, e.g. {example_lines(quarantined, r)})"
                            for r, n in by_reason.most_common(3))
            why = (f"fatal reasons {fatal}" if fatal else
                   f"{rejected:.1%} of rows rejected > data.max_rejected_fraction="
                   f"{data['max_rejected_fraction']}")
            raise StageError(f"validation gate failed: {why}; top reasons: {top}; "
                             f"see {QUARANTINE}")


def example_lines(quarantined: list[dict], reason: str, n: int = 3) -> str:
    hits = [q for q in quarantined if reason in q["reasons"]][:n]
    return ", ".join(f"{Path(q['source']).name}:{q['line']}" for q in hits)


if __name__ == "__main__":
    run_stage(main)

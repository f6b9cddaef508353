"""Stage validate: read every raw record, check it with a Great Expectations suite, quarantine
the rest.

1. Read `data.path` (files, globs; JSONL, JSON array, CSV, Parquet) row by row, and the fixed
   evaluation sets `data.test_path` / `data.validation_path` when set (their rows are tagged
   `fixed_split`, so split keeps them whole); an unreadable file stops the stage with one line
   naming it.
2. Decide the record kind (`data.kind`, or detected per file from the fields when `auto`) and
   turn each row into its canonical shape (stages/common/kinds.py); rows that do not fit get a
   structural reason code (missing_field, wrong_type, message_missing_key, ...).
3. Measure each canonical row (roles, order, empty turns, control characters, U+FFFD, leaked
   special tokens, answer format and labels of the task, token lengths with the base model's
   tokenizer and chat template, trainable tokens left after truncation) into a table, and run
   one GX expectation per rule over it. Failing rows go to the quarantine file with all their
   reason codes, the detail of a structural error, and their source file and line.
   Filled review sheets in `data.review.path` (stages/common/review.py) are read first: their
   verdicts are counted, and each correction replaces the answer of the records with its
   prompt (`data.review.corrections`), so the corrected record is what gets checked.
4. Too-long rows follow `data.length_policy`: reject (quarantine, counts against the gate),
   drop (quarantine, not counted against the gate) or truncate (kept; training cuts them at
   train.max_length; rows left with no trainable token are quarantined).

Outputs: data/interim/valid.jsonl, data/interim/quarantine.jsonl, data/interim/max_length.json
(train.max_length as a number: what `auto` chose), reports/validate.json and GX Data Docs under
reports/data_docs/. The gate fails the stage above
`data.max_rejected_fraction` rejected rows or on any reason in `data.fatal_reasons`.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from stages.common import expectations, paths, review, tracking
from stages.common.config import StageError, load_params, require_dependency, run_stage
from stages.common.examples import trained_turns
from stages.common.facts import (
    fact_table,
    label_columns,
    measure,
    measure_tokens,
    special_token_pattern,
)
from stages.common.files import md5_path, write_json, write_jsonl
from stages.common.kinds import (
    KINDS,
    RowError,
    canonical,
    detect_kind,
    kind_of,
    rename_fields,
)
from stages.common.records import read_file, record_id, resolve_paths
from stages.common.task import Task

VALID, QUARANTINE, DATA_DOCS = paths.VALID, paths.QUARANTINE, paths.DATA_DOCS
REPORT = paths.stage_report("validate")
MAX_LENGTH = paths.MAX_LENGTH  # the token budget train cuts at (train dep)
TOKENIZER_DIR, TRAINING_TEMPLATE = paths.BASE, paths.TRAINING_TEMPLATE
FIXED_SETS = ("test", "validation")  # data.<name>_path: evaluation sets that never move


# --- 1-2. rows -> canonical records --------------------------------------------------------


def choose_kinds(files: dict[Path, list[dict]], declared: str) -> dict[Path, str]:
    """The kind of each file: declared, or detected; files of different kinds are an error."""
    if declared != "auto":
        return dict.fromkeys(files, declared)
    kinds = {}
    for path, rows in files.items():
        objects = [r["obj"] for r in rows if r["parse_error"] is None]
        kind, counts = detect_kind(objects)
        if kind is None:
            if not rows:
                continue  # an empty file has no kind; it is reported, not guessed
            keys = sorted({k for o in objects if isinstance(o, dict) for k in o})[:8]
            raise StageError(
                f"{path}: cannot tell the record kind from its fields {keys}; "
                f"set data.kind to one of {', '.join(KINDS)}"
            )
        print(f"validate: {path}: detected kind '{kind}' ({counts[kind]} of {len(rows)} rows)")
        kinds[path] = kind
    if len(set(kinds.values())) > 1:
        listing = "; ".join(f"{p}: {k}" for p, k in kinds.items())
        raise StageError(
            f"data.path mixes record kinds ({listing}); use one kind per data set "
            f"or convert the files"
        )
    return kinds


def schema_drift(files: dict[Path, list[dict]]) -> dict[str, dict]:
    """Top-level fields each file has or lacks against the first file (same kind, other keys)."""
    keysets = {}
    for path, rows in files.items():
        objects = [
            r["obj"] for r in rows if r["parse_error"] is None and isinstance(r["obj"], dict)
        ]
        if objects:
            keysets[path] = set().union(*(o.keys() for o in objects))
    if len(keysets) < 2:
        return {}
    first_path, first = next(iter(keysets.items()))
    return {
        str(p): {
            "compared_to": str(first_path),
            "missing": sorted(first - keys),
            "extra": sorted(keys - first),
        }
        for p, keys in keysets.items()
        if keys != first
    }


def to_record(row: dict, kind: str) -> tuple[dict | None, str | None, str]:
    """(canonical record, structural reason, detail) of one raw row."""
    if row["parse_error"]:
        return None, row["parse_error"], ""
    try:
        fields, meta = canonical(kind, row["obj"])
    except RowError as err:
        found = kind_of(row["obj"])
        if err.reason == "missing_field" and found and found != kind:
            return None, "kind_mismatch", f"fields of a {found} record in a {kind} data set"
        return None, err.reason, err.detail
    record = {
        "id": record_id(fields),
        "source": row["source"],
        "line": row["line"],
        "kind": kind,
        **fields,
    }
    if meta:
        record["meta"] = meta
    return record, None, ""


def percentiles(values: list[int], qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "min": ordered[0],
        **{f"p{round(q * 100)}": pick(q) for q in qs},
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def auto_max_length(lengths: list[int], context: int) -> tuple[int | None, str]:
    """`train.max_length: auto`: the 99th percentile of the records' token lengths, rounded up
    to a multiple of 64 (headroom, and friendly to GPU kernels), never above the model's
    context. Longer rows (at most 1%) follow data.length_policy like any too-long row."""
    if not lengths:
        return None, "auto: no row measured"
    p99 = percentiles(lengths, (0.99,))["p99"]
    value = min(-(-p99 // 64) * 64, context if 0 < context < 10**7 else 10**7)
    return value, (
        f"auto: 99th percentile of {len(lengths)} rows is {p99} tokens, rounded up "
        f"to a multiple of 64"
        + (f", capped at the model's context {context}" if value == context else "")
    )


def main() -> None:
    """1. read the files; 2. canonical records; 3. measure every row; 4. run the GX suite;
    5. write the valid rows and the quarantine; 6. report; 7. the gate."""
    from transformers import AutoTokenizer

    params = load_params()
    data, task = params["data"], Task.from_params(params)
    sources, fixed = input_files(data)
    inputs = {str(p): md5_path(p) for p in sources}
    if data["review"]["path"]:
        require_dependency("validate", "data.review.path", data["review"]["path"])
        inputs["review"] = md5_path(Path(data["review"]["path"]))
    with tracking.stage_run("validate", params, ["data", "task", "train"], inputs) as run:
        files, rows = read_rows(sources, data["columns"])
        kinds = choose_kinds(files, data["kind"])
        drift = check_drift(files, data["schema_drift"])
        converted = canonical_records(rows, kinds, data["kind"], fixed)
        reviewed = (
            review.read_sheets(Path(data["review"]["path"])) if data["review"]["path"] else []
        )
        corrected = review.apply_corrections(
            [record for record, _, _ in converted], reviewed, data["review"]["corrections"]
        )
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # batch encoding below; no forks follow
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        facts, max_length, chosen = measure_rows(converted, tokenizer, params, task)
        kind = next(iter(kinds.values()), data["kind"])
        failures, summary = expectations.check_rows(
            fact_table(facts), task, max_length, data["length_policy"], kind, DATA_DOCS
        )
        valid, quarantined = sort_rows(rows, converted, failures)
        write_jsonl(VALID, valid)
        write_jsonl(QUARANTINE, quarantined)
        report = {
            **build_report(rows, valid, quarantined, facts, failures, files, kinds, fixed, drift),
            **length_report(facts, failures, max_length, chosen, data["length_policy"]),
            "class_balance": class_balance(facts, failures, task),
            "expectations": summary,
            "data_docs": str(DATA_DOCS / "index.html"),
            "review": corrected,
        }
        write_json(REPORT, report)
        # the number alone, apart from the report: new rows that leave it as it was retrain nothing
        write_json(MAX_LENGTH, {"max_length": max_length})
        by_reason = Counter(r for q in quarantined for r in q["reasons"])
        run.summary.update(
            {
                "validate/rows_in": len(rows),
                "validate/rows_out": len(valid),
                "validate/pass_rate": report["pass_rate"],
                **{f"validate/quarantined/{k}": v for k, v in by_reason.items()},
            }
        )
        print(
            f"validate: {len(rows)} rows in, {len(valid)} valid, {len(quarantined)} quarantined "
            f"{dict(by_reason)}"
        )
        gate(quarantined, len(rows), facts, data, task)


# --- the steps of main ------------------------------------------------------------------------


def input_files(data: dict) -> tuple[list[Path], dict[Path, str]]:
    """The files of `data.path`, then those of the fixed evaluation sets (file -> set name)."""
    sources = [require_dependency("validate", "data.path", p) for p in resolve_paths(data["path"])]
    fixed = fixed_set_paths(data, sources)  # file -> "test" | "validation"
    return sources + list(fixed), fixed


def read_rows(sources: list[Path], columns: dict) -> tuple[dict[Path, list[dict]], list[dict]]:
    """Every row of every file (fields renamed by `data.columns`), by file and in one list."""
    files = {path: read_file(path) for path in sources}
    for path, file_rows in files.items():
        if not file_rows:
            print(f"validate: warning: {path} holds no records")
        for row in file_rows:
            row["obj"] = rename_fields(row["obj"], columns)
    rows = [row for file_rows in files.values() for row in file_rows]
    if not rows:
        raise StageError(f"{', '.join(map(str, sources))}: no records")
    return files, rows


def check_drift(files: dict[Path, list[dict]], policy: str) -> dict[str, dict]:
    """Warn of fields that differ between files; `data.schema_drift: fail` stops the stage."""
    drift = schema_drift(files)
    for path, change in drift.items():
        print(
            f"validate: warning: schema drift in {path} against {change['compared_to']}: "
            f"missing {change['missing']}, extra {change['extra']}"
        )
    if drift and policy == "fail":
        raise StageError(f"schema drift between files: {drift}")
    return drift


def canonical_records(
    rows: list[dict], kinds: dict[Path, str], declared: str, fixed: dict[Path, str]
) -> list[tuple[dict | None, str | None, str]]:
    """(record, structural reason, detail) per row; rows of a fixed set are tagged with it."""
    converted = [to_record(row, kinds.get(Path(row["source"]), declared)) for row in rows]
    for record, _, _ in converted:
        if record is not None and Path(record["source"]) in fixed:
            record["fixed_split"] = fixed[Path(record["source"])]
    return converted


def measure_rows(
    converted: list[tuple], tokenizer, params: dict, task: Task
) -> tuple[list[dict], int | None, str]:
    """The facts of every row (one dict each, the columns of the GX table), with
    train.max_length resolved (`auto`: from the measured lengths) and how it was chosen."""
    setting, policy = params["train"]["max_length"], params["data"]["length_policy"]
    max_length = None if setting == "auto" else setting
    records = [record for record, _, _ in converted]
    leak_pattern = special_token_pattern(tokenizer)
    facts = [
        {"structure_error": reason, **measure(record, leak_pattern)}
        for record, reason, _ in converted
    ]
    train_on = trained_turns(params["objective"])
    template = TRAINING_TEMPLATE.read_text(encoding="utf-8")
    limit = max_length if policy == "truncate" else None
    measure_tokens(facts, records, tokenizer, template, train_on, limit)
    chosen = f"train.max_length={setting}"
    if setting == "auto":
        max_length, chosen = auto_max_length(
            [f["n_tokens"] for f in facts if f["n_tokens"]], tokenizer.model_max_length
        )
        print(f"validate: train.max_length=auto -> {max_length} ({chosen})")
        if policy == "truncate":  # trainable tokens left after the cut, for the rows cut
            over = [k for k, f in enumerate(facts) if (f["n_tokens"] or 0) > max_length]
            measure_tokens(
                [facts[k] for k in over],
                [records[k] for k in over],
                tokenizer,
                template,
                train_on,
                max_length,
            )
    label_columns(facts, task)
    return facts, max_length, chosen


def sort_rows(
    rows: list[dict], converted: list[tuple], failures: dict[int, list[str]]
) -> tuple[list[dict], list[dict]]:
    """Valid records, and quarantine entries (source, line, reasons, detail, the row as read)."""
    valid, quarantined = [], []
    for i, (row, (record, _, detail)) in enumerate(zip(rows, converted)):
        if i not in failures:
            valid.append(record)
            continue
        entry = {"source": row["source"], "line": row["line"], "reasons": failures[i]}
        if detail:
            entry["detail"] = detail
        entry["record"] = row["obj"]
        if "raw" in row:
            entry["raw"] = row["raw"]
        quarantined.append(entry)
    return valid, quarantined


def build_report(rows, valid, quarantined, facts, failures, files, kinds, fixed, drift) -> dict:
    """What came in, what went out and why, and the token lengths of what is kept."""
    by_reason = Counter(r for q in quarantined for r in q["reasons"])
    kept = [f for i, f in enumerate(facts) if i not in failures]
    report = {
        "rows_in": len(rows),
        "rows_out": len(valid),
        "rows_quarantined": len(quarantined),
        "pass_rate": round(len(valid) / len(rows), 4),
        "quarantined_by_reason": dict(sorted(by_reason.items())),
        "kinds": {str(p): k for p, k in kinds.items()},
        "files": {str(p): len(r) for p, r in files.items()},
        "fixed_sets": {
            name: {
                "files": [str(p) for p in set_files],
                "rows_in": sum(len(files[p]) for p in set_files),
                "rows_out": sum(r.get("fixed_split") == name for r in valid),
            }
            for name in FIXED_SETS
            if (set_files := [p for p, n in fixed.items() if n == name])
        },
        "empty_files": [str(p) for p, r in files.items() if not r],
        "schema_drift": drift,
        "token_length": percentiles([f["n_tokens"] for f in kept if f["n_tokens"] is not None]),
        "trainable_tokens": percentiles(
            [f["trainable_tokens"] for f in kept if f["trainable_tokens"]]
        ),
    }
    assert report["rows_in"] == report["rows_out"] + report["rows_quarantined"]
    return report


def length_report(
    facts: list[dict], failures: dict, max_length: int | None, chosen: str, policy: str
) -> dict:
    """max_length and how it was chosen; rows kept longer than it (training cuts them), and
    every row over it, whatever its fate."""
    cap = max_length or float("inf")
    kept = [f["n_tokens"] for i, f in enumerate(facts) if i not in failures]
    truncated = [n - max_length for n in kept if n and n > cap]
    over = [f["n_tokens"] - max_length for f in facts if f["n_tokens"] and f["n_tokens"] > cap]
    return {
        "max_length": max_length,  # what training cuts at (train reads it when auto)
        "max_length_chosen": chosen,
        "length_policy": policy,
        "truncated": {"rows": len(truncated), "tokens_cut": sum(truncated)},
        "over_max_length": {"rows": len(over), "tokens_over": sum(over)},
    }


def class_balance(facts: list[dict], failures: dict, task: Task) -> dict[str, int]:
    """Kept rows per stratum of the task's answer (task.stratify_by)."""
    balance = Counter(
        task.stratum(f["answer"])
        for i, f in enumerate(facts)
        if i not in failures and f["answer"] is not None and task.stratify_by
    )
    return dict(sorted(balance.items()))


def gate(quarantined: list[dict], n_rows: int, facts: list[dict], data: dict, task: Task) -> None:
    """Fail above data.max_rejected_fraction rejected rows or on a reason in
    data.fatal_reasons; `drop` means the user accepts losing too-long rows: they do not count."""
    by_reason = Counter(r for q in quarantined for r in q["reasons"])
    excused = {"too_long"} if data["length_policy"] == "drop" else set()
    rejected = sum(1 for q in quarantined if set(q["reasons"]) - excused) / n_rows
    fatal = [r for r in data["fatal_reasons"] if by_reason.get(r)]
    if rejected <= float(data["max_rejected_fraction"]) and not fatal:
        return
    top = ", ".join(
        f"{r} ({n}, e.g. {example_lines(quarantined, r)})" for r, n in by_reason.most_common(3)
    )
    why = (
        f"fatal reasons {fatal}"
        if fatal
        else f"{rejected:.1%} of rows rejected > data.max_rejected_fraction="
        f"{data['max_rejected_fraction']}"
    )
    hint, top_reason = "", by_reason.most_common(1)[0][0]
    if top_reason in ("answer_format", "label_outside_set"):
        hint = (
            f" (answers do not fit task '{task.name}': choose the task of this data, "
            f"e.g. -S task=generic for free text)"
        )
    elif top_reason == "too_long":
        longest = max(f["n_tokens"] or 0 for f in facts)
        hint = (
            f" (rows run to {longest} tokens: raise train.max_length, set it to null "
            f"for no cap, or choose data.length_policy: truncate or drop)"
        )
    raise StageError(f"validation gate failed: {why}; top reasons: {top}; see {QUARANTINE}{hint}")


def fixed_set_paths(data: dict, pool: list[Path]) -> dict[Path, str]:
    """Files of the fixed evaluation sets (data.test_path, data.validation_path) -> set name."""
    fixed: dict[Path, str] = {}
    for name in FIXED_SETS:
        if not data.get(f"{name}_path"):
            continue
        for path in resolve_paths(data[f"{name}_path"], key=f"data.{name}_path"):
            if path in pool or path in fixed:
                raise StageError(
                    f"data.{name}_path: {path} is also in "
                    f"{'data.path' if path in pool else 'the other fixed set'}; "
                    f"a file belongs to one set"
                )
            fixed[require_dependency("validate", f"data.{name}_path", path)] = name
    return fixed


def example_lines(quarantined: list[dict], reason: str, n: int = 3) -> str:
    hits = [q for q in quarantined if reason in q["reasons"]][:n]
    return ", ".join(f"{Path(q['source']).name}:{q['line']}" for q in hits)


if __name__ == "__main__":
    run_stage(main)

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
from dataclasses import dataclass, field
from pathlib import Path

from stages.common import expectations, paths, review, tracking
from stages.common.config import StageError, load_params, require_dependency, run_stage
from stages.common.engine import Spool, chunked, map_chunks
from stages.common.examples import trained_turns
from stages.common.facts import (
    fact_table,
    label_columns,
    measure,
    measure_tokens,
    special_token_pattern,
)
from stages.common.files import jsonl_lines, md5_path, text_writer, write_json
from stages.common.kinds import (
    KINDS,
    RowError,
    canonical,
    kind_of,
    rename_fields,
)
from stages.common.records import iter_file, parse_row, record_id, resolve_paths
from stages.common.task import Task

VALID, QUARANTINE, DATA_DOCS = paths.VALID, paths.QUARANTINE, paths.DATA_DOCS
REPORT = paths.stage_report("validate")
MAX_LENGTH = paths.MAX_LENGTH  # the token budget train cuts at (train dep)
TOKENIZER_DIR, TRAINING_TEMPLATE = paths.BASE, paths.TRAINING_TEMPLATE
FIXED_SETS = ("test", "validation")  # data.<name>_path: evaluation sets that never move


# --- 1-2. rows -> canonical records --------------------------------------------------------


def choose_kinds(sources: list[Path], declared: str, columns: dict) -> dict[Path, str]:
    """The kind of each file: declared, or detected from its rows (one streaming read of each
    file, for `auto` only); files of different kinds are an error."""
    if declared != "auto":
        return dict.fromkeys(sources, declared)
    kinds = {}
    for path in sources:
        counts, n_rows, keys = Counter(), 0, set()
        for row in iter_file(path):
            n_rows += 1
            if row["parse_error"] is None:
                obj = rename_fields(row["obj"], columns)
                counts[kind_of(obj)] += 1
                if isinstance(obj, dict):
                    keys.update(obj)
        counts.pop(None, None)
        if not counts:
            if not n_rows:
                continue  # an empty file has no kind; it is reported, not guessed
            raise StageError(
                f"{path}: cannot tell the record kind from its fields {sorted(keys)[:8]}; "
                f"set data.kind to one of {', '.join(KINDS)}"
            )
        kind = counts.most_common(1)[0][0]
        print(f"validate: {path}: detected kind '{kind}' ({counts[kind]} of {n_rows} rows)")
        kinds[path] = kind
    if len(set(kinds.values())) > 1:
        listing = "; ".join(f"{p}: {k}" for p, k in kinds.items())
        raise StageError(
            f"data.path mixes record kinds ({listing}); use one kind per data set "
            f"or convert the files"
        )
    return kinds


def schema_drift(keysets: dict[Path, set]) -> dict[str, dict]:
    """Top-level fields each file has or lacks against the first file (same kind, other keys)."""
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
    """1. the kinds of the files; 2. read, convert and measure every row, a chunk at a time
    (worker processes), keeping only the facts; 3. max_length; 4. run the GX suite over the
    facts; 5. write the valid rows and the quarantine; 6. report; 7. the gate."""
    from transformers import AutoTokenizer

    params = load_params()
    data, task = params["data"], Task.from_params(params)
    sources, fixed = input_files(data)
    inputs = {str(p): md5_path(p) for p in sources}
    if data["review"]["path"]:
        require_dependency("validate", "data.review.path", data["review"]["path"])
        inputs["review"] = md5_path(Path(data["review"]["path"]))
    with tracking.stage_run("validate", params, ["data", "task", "train"], inputs) as run:
        kinds = choose_kinds(sources, data["kind"], data["columns"])
        reviewed = (
            review.read_sheets(Path(data["review"]["path"])) if data["review"]["path"] else []
        )
        mode = data["review"]["corrections"]
        fixes = review.correction_index(reviewed, mode)
        setting, policy = params["train"]["max_length"], data["length_policy"]
        settings = {
            "columns": data["columns"],
            "kinds": kinds,
            "declared": data["kind"],
            "fixed": fixed,
            "fixes": fixes,
            "corrections": mode,
            "task": task,
            "train_on": trained_turns(params["objective"]),
            # rows are measured as training cuts them: known now unless max_length is auto
            "limit": setting if policy == "truncate" and setting != "auto" else None,
            # read here, not in the workers: a Ray worker's machine has no models/base
            "tokenizer": AutoTokenizer.from_pretrained(TOKENIZER_DIR),
            "template": TRAINING_TEMPLATE.read_text(encoding="utf-8"),
        }
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # batch encoding; workers turn it off
        with Spool(VALID.parent) as spool:
            survey = survey_rows(sources, settings, spool, data["engine"])
            drift = check_drift(survey.keysets, data["schema_drift"])
            max_length, chosen = resolve_max_length(survey, spool, settings, setting, policy)
            kind = next(iter(kinds.values()), data["kind"])
            failures, summary = expectations.check_rows(
                fact_table(survey.facts), task, max_length, policy, kind, DATA_DOCS
            )
            tally = write_rows(spool, survey.chunk_sizes, failures)
        report = {
            **build_report(survey, tally, failures, kinds, fixed, drift),
            **length_report(survey.facts, failures, max_length, chosen, policy),
            "class_balance": class_balance(survey.facts, failures, task),
            "expectations": summary,
            "data_docs": str(DATA_DOCS / "index.html"),
            "review": review.review_report(reviewed, fixes, survey.matched, mode),
        }
        write_json(REPORT, report)
        # the number alone, apart from the report: new rows that leave it as it was retrain nothing
        write_json(MAX_LENGTH, {"max_length": max_length})
        run.summary.update(
            {
                "validate/rows_in": survey.n_rows,
                "validate/rows_out": tally.rows_out,
                "validate/pass_rate": report["pass_rate"],
                **{f"validate/quarantined/{k}": v for k, v in tally.by_reason.items()},
            }
        )
        print(
            f"validate: {survey.n_rows} rows in, {tally.rows_out} valid, {tally.rows} "
            f"quarantined {dict(tally.by_reason)}"
        )
        longest = max((n or 0 for n in survey.facts["n_tokens"]), default=0)
        gate(tally, survey.n_rows, longest, data, task)


# --- the per-record work: engine.map_chunks runs it on each chunk, in worker processes ------

_WORK: dict = {}  # what setup_worker prepared in this process


def setup_worker(settings: dict) -> None:
    """Prepare what measuring a row needs (the settings, with the tokenizer and the training
    template) once per process."""
    _WORK.update(settings, leak_pattern=special_token_pattern(settings["tokenizer"]))


def measure_chunk(numbered: tuple[int, list[dict]]) -> tuple[list[dict], Counter, dict, tuple]:
    """Chunk `index` of raw rows -> (the facts of each row, the columns of the GX table; the
    corrections matched; rows and top-level fields per file; what to spool). What to spool:
    the rows (fields renamed by `data.columns`) and their (canonical record, structural
    reason, detail), rows of a fixed set tagged with it and reviewed corrections applied. A
    worker of this machine writes it to the spool itself (and returns None); a Ray worker,
    maybe on another machine, returns it."""
    index, rows = numbered
    work = _WORK
    rows = [parse_row(row) for row in rows]
    for row in rows:
        row["obj"] = rename_fields(row["obj"], work["columns"])
    converted = [
        to_record(row, work["kinds"].get(Path(row["source"]), work["declared"])) for row in rows
    ]
    for record, _, _ in converted:
        if record is not None and Path(record["source"]) in work["fixed"]:
            record["fixed_split"] = work["fixed"][Path(record["source"])]
    records = [record for record, _, _ in converted]
    matched = review.correct_records(records, work["fixes"], work["corrections"])
    facts = [
        {"structure_error": reason, **measure(record, work["leak_pattern"])}
        for record, reason, _ in converted
    ]
    tokenizer, template = work["tokenizer"], work["template"]
    measure_tokens(facts, records, tokenizer, template, work["train_on"], work["limit"])
    label_columns(facts, work["task"])
    spooled = (rows, converted)
    if work["spool"]:
        Spool.put(work["spool"], index, spooled)
        spooled = None
    files: dict[str, tuple[int, set]] = {}
    for row in rows:
        n, keys = files.get(row["source"], (0, set()))
        if row["parse_error"] is None and isinstance(row["obj"], dict):
            keys.update(row["obj"])
        files[row["source"]] = (n + 1, keys)
    return facts, matched, files, spooled


# --- the steps of main ------------------------------------------------------------------------


def input_files(data: dict) -> tuple[list[Path], dict[Path, str]]:
    """The files of `data.path`, then those of the fixed evaluation sets (file -> set name)."""
    sources = [require_dependency("validate", "data.path", p) for p in resolve_paths(data["path"])]
    fixed = fixed_set_paths(data, sources)  # file -> "test" | "validation"
    return sources + list(fixed), fixed


@dataclass
class Survey:
    """What the first pass keeps in memory: counts, and the facts as columns (small values
    per row); the rows themselves go to the spool."""

    files: dict[Path, int]  # rows per file
    keysets: dict[Path, set] = field(default_factory=dict)  # top-level fields per file
    facts: dict[str, list] = field(default_factory=dict)  # GX column -> value per row
    matched: Counter = field(default_factory=Counter)  # corrections -> records they fixed
    n_rows: int = 0
    chunk_sizes: list[int] = field(default_factory=list)  # rows per spooled chunk


def survey_rows(sources: list[Path], settings: dict, spool: Spool, engine: str) -> Survey:
    """Read, convert and measure every row of every file, a chunk at a time (data.engine:
    worker processes here, or Ray); the rows and their records go to the spool, their facts
    into the survey."""
    survey = Survey(files=dict.fromkeys(sources, 0))
    rows = (row for path in sources for row in iter_file(path, parse=False))
    settings = {**settings, "spool": spool.folder if engine == "local" else None}
    chunks = map_chunks(measure_chunk, enumerate(chunked(rows)), setup_worker, (settings,), engine)
    for index, (facts, matched, files, spooled) in enumerate(chunks):
        if spooled is not None:
            Spool.put(spool.folder, index, spooled)
        survey.n_rows += len(facts)
        survey.chunk_sizes.append(len(facts))
        survey.matched.update(matched)
        for source, (n, keys) in files.items():
            survey.files[Path(source)] += n
            if keys:
                survey.keysets.setdefault(Path(source), set()).update(keys)
        for name in facts[0]:
            survey.facts.setdefault(name, []).extend(f[name] for f in facts)
    for path, n in survey.files.items():
        if not n:
            print(f"validate: warning: {path} holds no records")
    if not survey.n_rows:
        raise StageError(f"{', '.join(map(str, sources))}: no records")
    return survey


def check_drift(keysets: dict[Path, set], policy: str) -> dict[str, dict]:
    """Warn of fields that differ between files; `data.schema_drift: fail` stops the stage."""
    drift = schema_drift(keysets)
    for path, change in drift.items():
        print(
            f"validate: warning: schema drift in {path} against {change['compared_to']}: "
            f"missing {change['missing']}, extra {change['extra']}"
        )
    if drift and policy == "fail":
        raise StageError(f"schema drift between files: {drift}")
    return drift


def resolve_max_length(survey: Survey, spool: Spool, settings: dict, setting, policy: str):
    """train.max_length (`auto`: from the measured lengths) and how it was chosen; under
    `truncate` the rows over an auto max_length are measured again as training cuts them."""
    if setting != "auto":
        return setting, f"train.max_length={setting}"
    if not _WORK:
        setup_worker(settings)  # the tokenizer, in this process (the pass ran in workers)
    tokenizer = _WORK["tokenizer"]
    lengths = survey.facts["n_tokens"]
    max_length, chosen = auto_max_length([n for n in lengths if n], tokenizer.model_max_length)
    print(f"validate: train.max_length=auto -> {max_length} ({chosen})")
    over = {i for i, n in enumerate(lengths) if (n or 0) > max_length} if max_length else set()
    if policy != "truncate" or not over:
        return max_length, chosen
    remeasured = ("template_error", "n_tokens", "trainable_tokens")
    start = 0
    for rows, converted in spool:  # trainable tokens left after the cut, for the rows cut
        picked = [start + k for k in range(len(rows)) if start + k in over]
        start += len(rows)
        if not picked:
            continue
        facts = [
            {c: survey.facts[c][i] for c in ("unknown_role", "role_order", "n_assistant")}
            for i in picked
        ]
        records = [converted[i - start + len(rows)][0] for i in picked]
        template, train_on = _WORK["template"], _WORK["train_on"]
        measure_tokens(facts, records, tokenizer, template, train_on, max_length)
        for i, f in zip(picked, facts):
            for c in remeasured:
                survey.facts[c][i] = f[c]
    return max_length, chosen


@dataclass
class Tally:
    """The quarantine in counts: by reason, by set of reasons (for the gate), a few lines each."""

    rows_out: int = 0
    rows: int = 0
    fixed_out: Counter = field(default_factory=Counter)  # valid rows per fixed set
    by_reason: Counter = field(default_factory=Counter)
    reason_sets: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first file:line

    def add(self, entry: dict) -> None:
        self.rows += 1
        self.by_reason.update(entry["reasons"])
        self.reason_sets[frozenset(entry["reasons"])] += 1
        for reason in entry["reasons"]:
            lines = self.examples.setdefault(reason, [])
            if len(lines) < 3:
                lines.append(f"{Path(entry['source']).name}:{entry['line']}")


def write_rows(spool: Spool, chunk_sizes: list[int], failures: dict[int, list[str]]) -> Tally:
    """Second pass: valid records to VALID, the rest to QUARANTINE (source, line, reasons,
    detail, the row as read), in input order; workers turn the spooled chunks into text."""
    tally, start, jobs = Tally(), 0, []
    for index, size in enumerate(chunk_sizes):
        failing = {i - start: failures[i] for i in range(start, start + size) if i in failures}
        jobs.append((spool.folder, index, failing))
        start += size
    with text_writer(VALID) as keep, text_writer(QUARANTINE) as set_aside:
        for valid, quarantined, fixed_out, entries in map_chunks(write_chunk, jobs):
            keep.write(valid)
            set_aside.write(quarantined)
            tally.fixed_out.update(fixed_out)
            tally.rows_out += sum(fixed_out.values())
            for entry in entries:
                tally.add(entry)
    return tally


def write_chunk(job: tuple) -> tuple[str, str, Counter, list[dict]]:
    """One spooled chunk as text: its valid records and its quarantine entries (with `failing`,
    position in the chunk -> reasons), valid rows per fixed set (None: the pool) and the
    entries' (source, line, reasons)."""
    folder, index, failing = job
    rows, converted = Spool.get(folder, index)
    valid, quarantined, fixed_out = [], [], Counter()
    for k, (row, (record, _, detail)) in enumerate(zip(rows, converted)):
        if k not in failing:
            valid.append(record)
            fixed_out[record.get("fixed_split")] += 1
            continue
        entry = {"source": row["source"], "line": row["line"], "reasons": failing[k]}
        if detail:
            entry["detail"] = detail
        entry["record"] = row["obj"]
        if "raw" in row:
            entry["raw"] = row["raw"]
        quarantined.append(entry)
    summary = [{k: e[k] for k in ("source", "line", "reasons")} for e in quarantined]
    return jsonl_lines(valid), jsonl_lines(quarantined), fixed_out, summary


def build_report(survey: Survey, tally: Tally, failures, kinds, fixed, drift) -> dict:
    """What came in, what went out and why, and the token lengths of what is kept."""
    facts = survey.facts
    kept_tokens = [n for i, n in enumerate(facts["n_tokens"]) if i not in failures]
    kept_trainable = [n for i, n in enumerate(facts["trainable_tokens"]) if i not in failures]
    report = {
        "rows_in": survey.n_rows,
        "rows_out": tally.rows_out,
        "rows_quarantined": tally.rows,
        "pass_rate": round(tally.rows_out / survey.n_rows, 4),
        "quarantined_by_reason": dict(sorted(tally.by_reason.items())),
        "kinds": {str(p): k for p, k in kinds.items()},
        "files": {str(p): n for p, n in survey.files.items()},
        "fixed_sets": {
            name: {
                "files": [str(p) for p in set_files],
                "rows_in": sum(survey.files[p] for p in set_files),
                "rows_out": tally.fixed_out[name],
            }
            for name in FIXED_SETS
            if (set_files := [p for p, n in fixed.items() if n == name])
        },
        "empty_files": [str(p) for p, n in survey.files.items() if not n],
        "schema_drift": drift,
        "token_length": percentiles([n for n in kept_tokens if n is not None]),
        "trainable_tokens": percentiles([n for n in kept_trainable if n]),
    }
    assert report["rows_in"] == report["rows_out"] + report["rows_quarantined"]
    return report


def length_report(
    facts: dict[str, list], failures: dict, max_length: int | None, chosen: str, policy: str
) -> dict:
    """max_length and how it was chosen; rows kept longer than it (training cuts them), and
    every row over it, whatever its fate."""
    cap = max_length or float("inf")
    lengths = facts["n_tokens"]
    kept = [n for i, n in enumerate(lengths) if i not in failures]
    truncated = [n - max_length for n in kept if n and n > cap]
    over = [n - max_length for n in lengths if n and n > cap]
    return {
        "max_length": max_length,  # what training cuts at (train reads it when auto)
        "max_length_chosen": chosen,
        "length_policy": policy,
        "truncated": {"rows": len(truncated), "tokens_cut": sum(truncated)},
        "over_max_length": {"rows": len(over), "tokens_over": sum(over)},
    }


def class_balance(facts: dict[str, list], failures: dict, task: Task) -> dict[str, int]:
    """Kept rows per stratum of the task's answer (task.stratify_by)."""
    if not task.stratify_by:
        return {}
    balance = Counter(
        task.stratum(answer)
        for i, answer in enumerate(facts["answer"])
        if i not in failures and answer is not None
    )
    return dict(sorted(balance.items()))


def gate(tally: Tally, n_rows: int, longest: int, data: dict, task: Task) -> None:
    """Fail above data.max_rejected_fraction rejected rows or on a reason in
    data.fatal_reasons; `drop` means the user accepts losing too-long rows: they do not count."""
    by_reason = tally.by_reason
    excused = {"too_long"} if data["length_policy"] == "drop" else set()
    rejected = sum(n for reasons, n in tally.reason_sets.items() if reasons - excused) / n_rows
    fatal = [r for r in data["fatal_reasons"] if by_reason.get(r)]
    if rejected <= float(data["max_rejected_fraction"]) and not fatal:
        return
    top = ", ".join(
        f"{r} ({n}, e.g. {', '.join(tally.examples[r])})" for r, n in by_reason.most_common(3)
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


if __name__ == "__main__":
    run_stage(main)

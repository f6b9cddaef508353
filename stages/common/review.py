"""Human review: the sheet evaluate writes, and the filled sheets validate reads back.

Evaluate writes reports/review_sheet.csv: a stratified, seeded sample of the test predictions,
one row each (input, reference, both answers) with empty `verdict`, `correction` and `comment`
columns. A reviewer fills it and commits it under data/review/ (any name ending in .csv):

    verdict     right | wrong | unsure   (empty: not reviewed)
    correction  the right answer, for a row marked wrong (optional)
    comment     anything

The next `dvc repro` reads every sheet there (validate): the verdicts are counted in
reports/validate.json and the model card, and each correction is applied as data.review.corrections
says: `relabel` (the records with that prompt get the corrected answer, where they are: a fixed
test set keeps its row, with the right reference), `train` (the corrected example moves into
train; its prompt leaves the evaluation sets) or `off`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from stages.common.config import StageError
from stages.common.files import md5_path
from stages.common.records import record_id

COLUMNS = (
    "id",
    "stratum",
    "input",
    "reference",
    "base",
    "tuned",
    "verdict",
    "correction",
    "comment",
    "prompt",  # the whole prompt as JSON messages: what a correction is matched by
)
VERDICTS = ("right", "wrong", "unsure")
MODES = ("relabel", "train", "off")  # data.review.corrections


def sample(predictions: list[dict], strata: list[str], size: int, seed: int) -> list[int]:
    """Indices of `size` predictions, stratified: each stratum shuffled (seeded), then taken in
    turn, so small strata are seen too; the same test set and seed give the same rows."""
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for i in sorted(range(len(predictions)), key=lambda i: predictions[i]["id"]):
        by_stratum[strata[i]].append(i)
    rng = random.Random(seed)
    queues = []
    for name in sorted(by_stratum):
        members = by_stratum[name]
        rng.shuffle(members)
        queues.append(members)
    picked: list[int] = []
    while len(picked) < min(size, len(predictions)):
        for queue in queues:
            if queue and len(picked) < size:
                picked.append(queue.pop())
    return sorted(picked, key=lambda i: (strata[i], predictions[i]["id"]))


def sheet_text(rows: list[dict]) -> str:
    """The sheet as CSV text (every column; verdict, correction and comment empty)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return out.getvalue()


def read_sheets(folder: Path) -> list[dict]:
    """Every reviewed row (a verdict set) of the sheets in `folder`, with its sheet and line; a
    sheet that is not one of ours, or a bad verdict, stops with the file, line and why."""
    rows = []
    for path in sorted(Path(folder).glob("*.csv")):
        try:
            text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte order mark
        except (OSError, UnicodeDecodeError) as err:
            raise StageError(f"{path}: cannot be read as UTF-8 text ({err})") from None
        reader = csv.DictReader(io.StringIO(text))
        missing = [
            c for c in ("verdict", "correction", "prompt") if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise StageError(f"{path}: not a review sheet (no column {missing[0]!r})")
        for row in reader:
            line = reader.line_num
            verdict = (row["verdict"] or "").strip().lower()
            correction = (row["correction"] or "").strip()
            if not verdict and not correction:
                continue  # not reviewed
            if verdict not in VERDICTS:
                raise StageError(
                    f"{path} line {line}: verdict {row['verdict']!r} is not one of "
                    f"{', '.join(VERDICTS)} (or empty)"
                )
            if correction and verdict != "wrong":
                raise StageError(
                    f"{path} line {line}: a correction needs the verdict `wrong` (it is {verdict})"
                )
            try:
                prompt = json.loads(row["prompt"])
                assert isinstance(prompt, list) and all("content" in m for m in prompt)
            except (ValueError, AssertionError, TypeError):
                raise StageError(
                    f"{path} line {line}: the prompt column is not the JSON messages the sheet "
                    "was written with"
                ) from None
            rows.append(
                {
                    "sheet": str(path),
                    "line": line,
                    "id": row.get("id", ""),
                    "verdict": verdict,
                    "correction": correction,
                    "prompt": prompt,
                }
            )
    return rows


def prompt_key(prompt: list[dict]) -> str:
    """What a correction and a record are matched by: their prompt, normalised as ids are."""
    return record_id([{"role": m["role"], "content": m["content"]} for m in prompt])


def correction_index(reviewed: list[dict], mode: str) -> dict[str, dict]:
    """The corrections of the sheets by the prompt they answer (a later sheet wins)."""
    if mode == "off":
        return {}
    return {prompt_key(row["prompt"]): row for row in reviewed if row["correction"]}


def correct_records(records: list[dict | None], fixes: dict[str, dict], mode: str) -> Counter:
    """Give every chat record whose prompt a correction names the corrected answer (in place;
    `train` also moves it into train); returns how many records each correction matched."""
    matched: Counter[str] = Counter()
    for record in records:
        if record is None or "messages" not in record or len(record["messages"]) < 2:
            continue
        key = prompt_key(record["messages"][:-1])
        fix = fixes.get(key)
        if fix is None or record["messages"][-1]["role"] != "assistant":
            continue
        was = record["messages"][-1]["content"]
        record["messages"][-1] = {"role": "assistant", "content": fix["correction"]}
        record["id"] = record_id({k: record[k] for k in ("messages", "tools") if k in record})
        record.setdefault("meta", {})["review"] = {
            "sheet": fix["sheet"],
            "line": fix["line"],
            "was": was,
        }
        if mode == "train":
            record["fixed_split"] = "train"
        matched[key] += 1
    return matched


def review_report(reviewed: list[dict], fixes: dict[str, dict], matched: Counter, mode: str):
    """The `review` block of validate's report: the sheets, their verdicts, what was corrected."""
    sheets = sorted({r["sheet"] for r in reviewed})
    return {
        "sheets": {s: md5_path(Path(s)) for s in sheets},
        "reviewed": len(reviewed),
        "verdicts": {v: sum(r["verdict"] == v for r in reviewed) for v in VERDICTS},
        "corrections": sum(bool(r["correction"]) for r in reviewed),
        "mode": mode,
        "records_corrected": sum(matched.values()),
        # corrections whose prompt no record has (a sheet of another data version)
        "unmatched": [
            {"sheet": r["sheet"], "line": r["line"]} for key, r in fixes.items() if not matched[key]
        ],
    }

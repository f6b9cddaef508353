"""Production feedback: what `make serve` logs, what people say about its answers, and the data
version `make feedback` makes of them.

With `serve.log_requests: true` the server appends every chat answer to
<serve.log_dir>/requests.jsonl ({id, time, messages as the model got them, answer}), and takes
feedback on an answer's id (POST /v1/feedback, or `scripts/feedback.py rate`) into
feedback.jsonl ({id, time, rating: good | bad, correction?}). Both files hold users' text: the
folder is git-ignored, and entries older than `serve.retention_days` are deleted when the server
starts and when `make feedback` runs.

`make feedback` (scripts/feedback.py export) turns the rated answers not exported before into
chat records in data/raw/feedback/<time>.jsonl (then `dvc add`ed: a new data version): an answer
rated good trains as it was, a bad one with a correction trains as corrected; a bad one without
a correction, or one nobody rated, is left out and counted by reason in <time>.report.json.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

from stages.common.config import StageError
from stages.common.files import read_jsonl, write_json, write_jsonl

REQUESTS, FEEDBACK = "requests.jsonl", "feedback.jsonl"
RATINGS = ("good", "bad")
DAY = 86400.0
EXPORT_DIR = Path("data/raw/feedback")  # the data version `make feedback` writes


class FeedbackLog:
    """The two append-only files of one server (one writer thread at a time)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.lock = threading.Lock()

    def _append(self, name: str, entry: dict) -> None:
        with self.lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with (self.folder / name).open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def answer(self, answer_id: str, messages: list[dict], answer: str) -> None:
        self._append(
            REQUESTS,
            {"id": answer_id, "time": time.time(), "messages": messages, "answer": answer},
        )

    def known(self, answer_id: str) -> bool:
        return any(e["id"] == answer_id for e in read(self.folder / REQUESTS))

    def rate(self, answer_id: str, rating: str, correction: str | None = None) -> dict:
        """Record a rating of a logged answer; raises StageError for an unknown id or rating."""
        if rating not in RATINGS:
            raise StageError(f"rating {rating!r}: one of {', '.join(RATINGS)}")
        if correction and rating != "bad":
            raise StageError("a correction goes with the rating `bad`")
        if not self.known(answer_id):
            raise StageError(f"no logged answer has the id {answer_id!r}")
        entry = {"id": answer_id, "time": time.time(), "rating": rating}
        if correction:
            entry["correction"] = correction
        self._append(FEEDBACK, entry)
        return entry

    def prune(self, retention_days: float, now: float | None = None) -> int:
        """Delete entries older than the retention; returns how many went."""
        cutoff = (now or time.time()) - retention_days * DAY
        removed = 0
        with self.lock:
            for name in (REQUESTS, FEEDBACK):
                path = self.folder / name
                entries = read(path)
                kept = [e for e in entries if e["time"] >= cutoff]
                removed += len(entries) - len(kept)
                if len(kept) != len(entries):
                    write_jsonl(path, kept)
        return removed


def read(path: Path) -> list[dict]:
    """A log file's entries; none before the first answer."""
    return read_jsonl(path) if path.exists() else []


def export(folder: Path, out_dir: Path = EXPORT_DIR, stamp: str | None = None) -> dict:
    """The rated answers not exported before, as chat records in out_dir/<stamp>.jsonl (the
    latest rating of an answer wins), the rest counted by reason in out_dir/<stamp>.report.json;
    returns that report. Earlier exports stay as they are: the log's retention never shrinks
    the data."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    done = {r["feedback"]["id"] for path in sorted(out_dir.glob("*.jsonl")) for r in read(path)}
    ratings = {e["id"]: e for e in read(Path(folder) / FEEDBACK)}  # in time order: latest wins
    records, left_out = [], Counter()
    answers = read(Path(folder) / REQUESTS)
    for entry in answers:
        rated = ratings.get(entry["id"])
        if entry["id"] in done:
            left_out["exported_before"] += 1
        elif rated is None:
            left_out["not_rated"] += 1
        elif rated["rating"] == "bad" and not rated.get("correction"):
            left_out["bad_without_correction"] += 1
        else:
            answer = rated.get("correction") or entry["answer"]
            records.append(
                {
                    "messages": [*entry["messages"], {"role": "assistant", "content": answer}],
                    # validate keeps a key the kind does not use under `meta`: meta.feedback
                    "feedback": {
                        "id": entry["id"],
                        "rating": rated["rating"],
                        "corrected": bool(rated.get("correction")),
                        "answered_at": entry["time"],
                    },
                }
            )
    report = {
        "file": None,
        "answers_logged": len(answers),
        "records": len(records),
        "corrected": sum(r["feedback"]["corrected"] for r in records),
        "left_out": dict(sorted(left_out.items())),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if records:
        report["file"] = str(out_dir / f"{stamp}.jsonl")
        write_jsonl(Path(report["file"]), records)
        write_json(out_dir / f"{stamp}.report.json", report)
    return report

"""Reading raw data files into canonical records, without losing a line.

`read_raw(paths)` turns every line of every input file into one row: either a parsed object or
a parse error with its reason code, always with `source` (the file) and `line` (1-based), so
validation can quarantine what it cannot use and point back at the original line.

Canonical chat record, as written by the data stages (JSONL):
    {"id": "<stable content hash>", "source": "data/raw/x.jsonl", "line": 12,
     "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from stages.common.config import StageError

ROLES = ("system", "user", "assistant")
KINDS = ("messages", "auto")  # more record kinds arrive with the format readers (issue 3)
READABLE_SUFFIXES = (".jsonl", ".json")


def resolve_paths(spec: str | list[str]) -> list[Path]:
    """`data.path` as a file, a glob, or a list of either -> sorted existing files."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for item in specs:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not Path(matches[0]).exists():
            raise StageError(f"data.path: {item}: no such file")
        paths += [Path(m) for m in matches]
    for path in paths:
        if path.suffix not in READABLE_SUFFIXES:
            raise StageError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .json)")
    return paths


def _row(source: Path, line: int, obj: Any = None, error: str | None = None, raw: bytes = b"") -> dict:
    row = {"source": str(source), "line": line, "obj": obj, "parse_error": error}
    if error:  # keep the unreadable line itself, so the quarantine loses nothing
        row["raw"] = raw.decode("utf-8", errors="replace")
    return row


def read_file(path: Path) -> list[dict]:
    """One row per non-blank line of a JSONL file, or per element of a JSON array."""
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            items = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StageError(f"{path}: not a readable JSON document ({err})") from err
        if not isinstance(items, list):
            raise StageError(f"{path}: a .json data file must hold an array of records")
        return [_row(path, i + 1, obj) for i, obj in enumerate(items)]
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark from an editor export
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            rows.append(_row(path, number, error="invalid_utf8", raw=raw))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            rows.append(_row(path, number, error="malformed_json", raw=raw))
            continue
        rows.append(_row(path, number, obj))
    return rows


def read_raw(paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        rows += read_file(path)
    return rows


def normalize_text(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: the form dedup compares."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def record_id(messages: list[dict]) -> str:
    """Stable id: hash of the normalised conversation (same content -> same id)."""
    canonical = json.dumps([[m["role"], normalize_text(m["content"])] for m in messages])
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def prompt_messages(record: dict) -> list[dict]:
    """Everything before the final assistant answer."""
    return record["messages"][:-1]


def answer_text(record: dict) -> str:
    return record["messages"][-1]["content"]

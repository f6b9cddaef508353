"""Reading raw data files into rows, without losing a line; stable ids and text normalisation.

`read_file(path)` turns every line of a JSONL file, every element of a JSON array and every row
of a CSV or Parquet file into one row: a parsed object, or a parse error with its reason code,
always with `source` (the file) and `line` (1-based line in the file; the row number for
Parquet), so validation can quarantine what it cannot use and point back at the original.
A file that cannot be read at all raises StageError with one line naming the file and why.
Record kinds and their canonical shapes are in `stages/common/kinds.py`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.common.config import StageError

READABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
LINE_ENDS = re.compile(rb"\r\n|\n|\r")  # JSON strings escape CR and LF, so any of them ends a row
TEXT_LINE_ENDS = re.compile(r"\r\n|\n|\r")
MAX_DEPTH = 100  # nesting levels of one record: real data has a few; deeper overflows the stack
SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no tokenizer or file takes it
csv.field_size_limit(2**31 - 1)  # a cell of a long document is data, not a malformed row


def resolve_paths(spec: str | list[str], key: str = "data.path") -> list[Path]:
    """`data.path` (or the config `key` named) as a file, a glob, or a list of either ->
    existing files, in order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for item in specs:
        if Path(item).is_dir():
            raise StageError(f"{key}: {item} is a folder: name its files, e.g. {item}/*.jsonl")
        # a glob's folders (a sub-folder of data/raw, say) are not data files
        matches = (
            [m for m in sorted(glob.glob(item)) if Path(m).is_file()]
            if glob.has_magic(item)
            else [item]
        )
        if not matches or not Path(matches[0]).is_file():
            raise StageError(f"{key}: {item}: no such file")
        paths += [Path(m) for m in matches if Path(m) not in paths]
    for path in paths:
        if path.suffix.lower() not in READABLE_SUFFIXES:
            raise StageError(
                f"{path}: unsupported file type {path.suffix!r} "
                f"(use {', '.join(READABLE_SUFFIXES)})"
            )
    return paths


def _row(
    source: Path, line: int, obj: Any = None, error: str | None = None, raw: bytes | str = b""
) -> dict:
    row = {"source": str(source), "line": line, "obj": obj, "parse_error": error}
    if error:  # keep the unreadable line itself, so the quarantine loses nothing
        row["raw"] = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return row


def looks_binary(data: bytes) -> bool:
    """A file of mostly NULs or undecodable bytes is not text data, whatever its name says."""
    head = data[:8192]
    if not head:
        return False
    if head.count(b"\x00") > len(head) // 10:
        return True
    return head.decode("utf-8", errors="replace").count("\ufffd") > len(head) // 10


def parse_json(text: str) -> tuple[Any, str | None]:
    """(object, None) or (None, reason code) for one JSON document: malformed_json,
    nesting_too_deep (over MAX_DEPTH levels), number_too_long (over Python's 4300 digits),
    duplicate_key (a second value of one key would silently win), lone_surrogate (an unpaired
    \\ud83d escape)."""

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise KeyError(next(k for k in keys if keys.count(k) > 1))
        return dict(pairs)

    try:
        obj = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError:
        return None, "malformed_json"
    except RecursionError:
        return None, "nesting_too_deep"
    except ValueError:  # the int() limit on digits
        return None, "number_too_long"
    except KeyError:
        return None, "duplicate_key"
    return (None, error) if (error := value_defect(obj, text)) else (obj, None)


def value_defect(value: Any, text: str | None = None) -> str | None:
    """nesting_too_deep or lone_surrogate for a parsed value, else None; `text`, the JSON it
    came from, lets the common case (few brackets, no escapes) skip the walk."""
    if text is not None and "\\u" not in text and text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    if nesting_depth(value) > MAX_DEPTH:
        return "nesting_too_deep"
    return "lone_surrogate" if has_surrogate(value) else None


def _walk(value: Any):
    """(value, depth) of a value and everything inside it, without recursion (a value may be
    nested as deep as the JSON parser allows)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack += [(x, depth + 1) for pair in item.items() for x in pair]
        elif isinstance(item, list):
            stack += [(x, depth + 1) for x in item]


def nesting_depth(value: Any) -> int:
    return max(depth + isinstance(item, (dict, list)) for item, depth in _walk(value))


def has_surrogate(value: Any) -> bool:
    return any(isinstance(item, str) and SURROGATE.search(item) for item, _ in _walk(value))


def read_jsonl_rows(path: Path, data: bytes) -> list[dict]:
    """Raw input rows of JSONL bytes, each with its line and parse error (the pipeline's own
    files, trusted, are read by files.read_jsonl)."""
    rows = (_jsonl_row(path, number, raw) for number, raw in enumerate(LINE_ENDS.split(data), 1))
    return [row for row in rows if row is not None]


def _jsonl_row(path: Path, number: int, raw: bytes) -> dict | None:
    """One JSONL line as a row (None for a blank line: skipped, numbering is preserved)."""
    # a UTF-8 byte order mark from an editor export (on any line: exports concatenated)
    raw = raw.removeprefix(BOM)
    if not raw.strip():
        return None
    if b"\x00" in raw:
        return _row(path, number, error="nul_byte", raw=raw.replace(b"\x00", b""))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _row(path, number, error="invalid_utf8", raw=raw)
    obj, error = parse_json(text)
    if error:
        return _row(path, number, error=error, raw=SURROGATE.sub("\ufffd", text))
    return _row(path, number, obj)


def iter_jsonl_rows(path: Path, stream, block: int = 1 << 20, parse: bool = True) -> Iterator[dict]:
    """read_jsonl_rows over a binary stream, a block at a time: the same rows, in memory that
    does not grow with the file. LF, CRLF or CR-only line ends. Without `parse`, each line
    comes unparsed, for parse_row to finish where the work is shared out."""
    rest, number = b"", 0
    while True:
        data = stream.read(block)
        buffer = rest + data
        # a CR at the end may be the first half of a CRLF: keep it for the next block
        held = b"\r" if data and buffer.endswith(b"\r") else b""
        lines = LINE_ENDS.split(buffer[: len(buffer) - len(held)])
        rest = (lines.pop() + held) if data else b""
        for raw in lines:
            number += 1
            if not parse:
                if raw.removeprefix(BOM).strip():
                    yield {"source": str(path), "line": number, "unparsed": raw}
            elif (row := _jsonl_row(path, number, raw)) is not None:
                yield row
        if not data:
            return


def parse_row(row: dict) -> dict:
    """The row of an unparsed JSONL line (iter_file(..., parse=False)); other rows as they are."""
    if "unparsed" not in row:
        return row
    return _jsonl_row(Path(row["source"]), row["line"], row["unparsed"])


def read_json_array(path: Path, data: bytes) -> list[dict]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise StageError(f"{path}: not UTF-8 text (byte {err.start})") from err
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(
            f"{path}:{err.lineno}:{err.colno}: not a valid JSON document ({err.msg})"
        ) from err
    except (RecursionError, ValueError) as err:
        why = "nested too deep" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise StageError(f"{path}: not a readable JSON document ({why})") from err
    if isinstance(items, dict):
        raise StageError(
            f"{path}: a .json data file must hold an array of records, "
            f"found an object (JSON Lines go in .jsonl)"
        )
    if not isinstance(items, list):
        raise StageError(f"{path}: a .json data file must hold an array of records")
    # walk the array with raw_decode: the line each element starts on, and the defects of each
    # element alone (a key given twice, too deep, a lone surrogate) for its own row
    duplicated: list[bool] = []

    def pairs_hook(pairs):
        duplicated.append(len({k for k, _ in pairs}) != len(pairs))
        return dict(pairs)

    decoder = json.JSONDecoder(object_pairs_hook=pairs_hook)
    rows, pos, counted, line = [], text.index("[") + 1, 0, 1
    for _ in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += len(TEXT_LINE_ENDS.findall(text, counted, pos))
        counted = pos
        duplicated.clear()
        obj, end = decoder.raw_decode(text, pos)
        error = "duplicate_key" if any(duplicated) else value_defect(obj, text[pos:end])
        rows.append(
            _row(path, line, error=error, raw=SURROGATE.sub("\ufffd", text[pos:end]))
            if error
            else _row(path, line, obj)
        )
        pos = end
    return rows


MESSAGE_FIELDS = {"role", "content", "from", "value", "weight"}


def _cell(value: str) -> tuple[Any, str | None]:
    """CSV cells are strings. A cell holding a JSON list (messages) or one message object is
    parsed; any other text, JSON-looking answers included, stays a string. (value, reason): a
    list cell that is JSON but unusable (a lone surrogate, too deep, ...) gets its reason."""
    stripped = value.strip()
    if stripped[:1] not in ("[", "{"):
        return value, None
    parsed, error = parse_json(stripped)
    if error:
        return value, (error if stripped[0] == "[" and error != "malformed_json" else None)
    if isinstance(parsed, list) or (
        isinstance(parsed, dict) and parsed and set(parsed) <= MESSAGE_FIELDS
    ):
        return parsed, None
    return value, None


def read_csv(path: Path, data: bytes) -> list[dict]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise StageError(
            f"{path}: not UTF-8 text (byte {err.start}); save the CSV as UTF-8"
        ) from err
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as err:
        raise StageError(f"{path}:1: unreadable CSV header ({err})") from err
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise StageError(f"{path}:1: CSV header needs unique, non-empty column names: {header}")
    rows, start = [], reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            rows.append(_row(path, start, error="malformed_csv", raw=str(err)))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if "\x00" in "".join(cells):
            rows.append(_row(path, line, error="nul_byte", raw=",".join(cells).replace("\x00", "")))
        elif len(cells) != len(header):
            rows.append(
                _row(
                    path,
                    line,
                    error="malformed_csv",
                    raw=f"{len(cells)} fields, header has {len(header)}: " + ",".join(cells),
                )
            )
        else:
            parsed = [_cell(c) for c in cells]
            error = next((e for _, e in parsed if e), None)
            rows.append(
                _row(path, line, error=error, raw=SURROGATE.sub("\ufffd", ",".join(cells)))
                if error
                else _row(path, line, {h: v for h, (v, _) in zip(header, parsed)})
            )
    return rows


def read_parquet(path: Path) -> list[dict]:
    return list(iter_parquet(path))


def iter_parquet(path: Path, batch_rows: int = 10_000) -> Iterator[dict]:
    """The rows of a Parquet file, a record batch at a time."""
    import pyarrow.parquet as pq

    def unreadable(err: Exception) -> StageError:
        return StageError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})")

    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=batch_rows)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise unreadable(err) from err
    names = parquet.schema_arrow.names
    if len(set(names)) != len(names):  # a record would keep one of the values, silently
        twice = sorted({n for n in names if names.count(n) > 1})
        raise unreadable(ValueError(f"duplicate column names {twice}"))
    number = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001  (a damaged page further on)
            raise unreadable(err) from err
        try:
            objects = batch.to_pylist()
        except Exception:  # noqa: BLE001  (a value Python cannot hold: find its rows one by one)
            objects = None
        for i in range(batch.num_rows):
            number += 1
            yield _parquet_row(path, number, batch, i, objects)


def _parquet_row(path: Path, number: int, batch, i: int, objects: list | None) -> dict:
    try:
        obj = objects[i] if objects is not None else batch.slice(i, 1).to_pylist()[0]
        return _row(path, number, _plain_value(obj))
    except TypeError as err:  # a binary cell: bytes are not text data
        return _row(path, number, error="binary_value", raw=str(err))
    except UnicodeDecodeError as err:  # a string column holding bytes that are not UTF-8
        return _row(path, number, error="invalid_utf8", raw=str(err))
    except Exception as err:  # noqa: BLE001  (a date past year 9999, ...: pyarrow's error)
        return _row(
            path,
            number,
            error="unreadable_value",
            raw=f"{type(err).__name__}: {err}".splitlines()[0],
        )


def _plain_value(value: Any) -> Any:
    """A Parquet value as JSON has it: timestamps and dates as ISO text, decimals as numbers."""
    import datetime
    import decimal

    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a map column comes as a list of (key, value)
        return [_plain_value(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(f"a binary value ({len(value)} bytes)")
    return value


def read_file(path: Path) -> list[dict]:
    """One row per record of a JSONL, JSON-array, CSV or Parquet file."""
    return list(iter_file(path))


def iter_file(path: Path, parse: bool = True) -> Iterator[dict]:
    """read_file's rows one at a time. JSONL and Parquet stream, in memory that does not grow
    with the file; a JSON array or a CSV file is read whole first (convert a large one to
    JSONL or Parquet). A file that cannot be read raises StageError before the first row.
    `parse=False` leaves JSONL lines for parse_row (in worker processes)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return iter_parquet(path)
    try:
        stream = path.open("rb")
        head = stream.read(8192)
    except OSError as err:
        raise StageError(f"{path}: cannot be read ({err.strerror or err})") from err
    if suffix == ".jsonl" and not head.startswith(UTF16_BOMS) and not looks_binary(head):
        stream.seek(0)
        return _closing(iter_jsonl_rows(path, stream, parse=parse), stream)
    data = head + stream.read()
    stream.close()
    if data.startswith(UTF16_BOMS):  # Windows tools save "Unicode" text as UTF-16
        try:
            data = data.decode("utf-16").encode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError as err:
            raise StageError(f"{path}: starts as UTF-16 but is not (byte {err.start})") from err
    if looks_binary(data):
        head = data[:8192]
        if max(head[0::2].count(0), head[1::2].count(0)) > len(head) * 2 // 5:  # every other byte
            raise StageError(
                f"{path}: looks like UTF-16 text without a byte order mark; save it as UTF-8"
            )
        raise StageError(f"{path}: looks like a binary file, not {suffix[1:].upper()} text")
    if suffix == ".json":
        return iter(read_json_array(path, data))
    if suffix == ".csv":
        return iter(read_csv(path, data))
    return iter(read_jsonl_rows(path, data))


def _closing(rows: Iterator[dict], stream) -> Iterator[dict]:
    with stream:
        yield from rows


def normalize_text(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: the form dedup compares."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def record_id(content: Any) -> str:
    """Stable id: hash of the normalised content (same content -> same id), whatever the kind.
    Only text is normalised (message contents, raw text); roles and keys are taken as they are."""

    def norm(value: Any, key: str = "") -> Any:
        if isinstance(value, str):
            return normalize_text(value) if key in ("", "content", "text") else value
        if isinstance(value, dict):
            return [[k, norm(value[k], k)] for k in sorted(value)]
        if isinstance(value, list):
            return [norm(v) for v in value]
        return value

    return hashlib.sha1(json.dumps(norm(content)).encode("utf-8")).hexdigest()[:16]


LOCATION_FIELDS = ("id", "source", "line", "fixed_split")


def set_hash(records: list[dict]) -> str:
    """Content hash of a set of records (an evaluation set): sha256 over each record's exact
    content, sorted, so file names, line numbers and row order do not change it."""
    rows = sorted(
        json.dumps(
            {k: v for k, v in r.items() if k not in LOCATION_FIELDS},
            sort_keys=True,
            ensure_ascii=False,
        )
        for r in records
    )
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()

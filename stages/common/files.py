"""Atomic writes and content hashes.

Outputs are written to a temporary name and renamed, so a crash never leaves a half-written
file that DVC would hash as a result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _dumps(row: dict) -> str:
    try:  # the common case: nothing to clean, and no recursive walk over every record
        return json.dumps(row, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_clean(row), ensure_ascii=False, allow_nan=False)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
    except BaseException:  # e.g. text that UTF-8 cannot encode: no half-written file remains
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(_clean(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    lines = [_dumps(r) for r in rows]
    write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


@contextmanager
def text_writer(path: Path):
    """Yield a text file to write `path` through; it appears whole when the block succeeds
    (a failed run leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", buffering=1 << 20) as out:
            yield out
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def jsonl_lines(rows: Iterable[dict]) -> str:
    """Rows as write_jsonl writes them."""
    return "".join(_dumps(row) + "\n" for row in rows)


@contextmanager
def jsonl_writer(path: Path):
    """Yield a function that appends one row to `path`, written like write_jsonl's rows; the
    file appears whole when the block succeeds."""
    with text_writer(path) as out:
        yield lambda row: out.write(_dumps(row) + "\n")


def iter_jsonl(path: Path):
    """read_jsonl's rows one at a time."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path: Path) -> list[dict]:
    """Read a file this pipeline wrote (trusted format; raw input goes through records)."""
    return list(iter_jsonl(path))


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder that replaces `path` only when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def md5_path(path: Path) -> str:
    """md5 of a file, or of a folder's sorted (relative path, file md5) list."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    listing = sorted(
        (str(p.relative_to(path)), md5_file(p)) for p in path.rglob("*") if p.is_file()
    )
    return hashlib.md5(json.dumps(listing).encode()).hexdigest()


def safetensors_summary(folder: Path) -> tuple[int, str]:
    """(parameter count, torch dtype name of most parameters) of a model folder, read from the
    safetensors headers: no tensor is loaded."""
    from safetensors import safe_open

    counts: Counter = Counter()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                piece = f.get_slice(name)
                counts[piece.get_dtype()] += math.prod(piece.get_shape())
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
    dtype = counts.most_common(1)[0][0] if counts else "F32"
    return sum(counts.values()), names.get(dtype, dtype.lower())

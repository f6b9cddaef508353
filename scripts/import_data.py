"""Import a data set from the Hugging Face Hub, an Arrow folder or Parquet into data/raw as JSONL.

    python scripts/import_data.py tatsu-lab/alpaca --out data/raw/alpaca.jsonl --limit 2000
    python scripts/import_data.py org/set --config en --split test --revision v1.0 \
        --out data/raw/x.jsonl
    python scripts/import_data.py path/to/save_to_disk_folder --split train --out data/raw/x.jsonl
    python scripts/import_data.py path/to/parquet_folder_or_file --out data/raw/x.jsonl

SOURCE is a local folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, a
Parquet file or folder (split files named as on the Hub, e.g. data/train-00000-of-00002.parquet;
otherwise every file is `train`, read in sorted path order), or else a Hub id. Hub downloads
need the network (HF_TOKEN from the environment for gated sets; it is never written anywhere);
with HF_HUB_OFFLINE=1 a copy in the datasets cache is used. Without --split: `train`.

Writes one JSON object per row (UTF-8, keys as in the source; dates as ISO strings, NaN as
null) and, beside it, NAME.source.json: source, kind (hub | arrow | parquet), config, split, the
resolved revision (the Hub commit sha, or for local files "sha256:" over their sorted relative
paths and bytes), rows, the JSONL's sha256, the datasets version and the command line. Both are
written atomically, and the same input gives byte-identical files (no timestamps).
Then track the data (`dvc add data/raw/NAME.jsonl`, or commit it) and point the pipeline at it:
`dvc exp run -S data.path=data/raw/NAME.jsonl -S data.kind=auto`. Glob data.path with
`data/raw/*.jsonl`, never `data/raw/*`: the sidecar .source.json is not data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import hashlib
import itertools
import json
import math
import os
import shlex
import sys
from pathlib import Path


class Fail(Exception):  # one line for the user, no traceback
    pass


def files_sha256(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def pick_split(available: list[str] | None, split: str | None, source: str) -> str | None:
    if available is None:  # a single Dataset folder has no splits
        if split:
            raise Fail(f"{source} holds a single data set, no splits: drop --split")
        return None
    split = split or "train"
    if available and split not in available:
        raise Fail(f"{source}: no split '{split}'; available: {', '.join(available)}")
    return split


def open_arrow(path: Path, split: str | None):
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    split = pick_split(list(data) if isinstance(data, DatasetDict) else None, split, str(path))
    table = data[split] if split else data
    files = [f for f in path.rglob("*") if f.is_file()]  # the whole folder: it loads it all
    return split, files_sha256(path, files), table.with_format("arrow").iter(batch_size=1000)


def open_parquet(path: Path, split: str | None):
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict, get_data_patterns

    name, path = str(path), path.resolve()
    root = path.parent if path.is_file() else path
    by_split = (
        {"train": [str(path)]}
        if path.is_file()
        else DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
    )  # the Hub's split naming, or all train
    by_split = {
        str(s): [Path(f) for f in fs if f.endswith(".parquet")] for s, fs in by_split.items()
    }
    by_split = {s: fs for s, fs in by_split.items() if fs}
    if not by_split:
        raise Fail(f"{name}: no .parquet files, and not a save_to_disk folder")
    split = pick_split(list(by_split), split, name)
    files = sorted(by_split[split], key=lambda p: p.relative_to(root).as_posix())
    batches = (b for f in files for b in pq.ParquetFile(f).iter_batches(batch_size=1000))
    return split, files_sha256(root, files), batches


def open_hub(name: str, config: str | None, split: str | None, revision: str | None, limit):
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(name, config, revision=revision)
        available = list(builder.info.splits or builder.config.data_files or [])
        split = pick_split(available, split, name)
        if limit is not None:  # stream: no need to download a whole set for a sample
            data = builder.as_streaming_dataset(split=split)
        else:
            builder.download_and_prepare()
            data = builder.as_dataset(split=split)
    except ConnectionError:  # datasets has tried its cache too by then
        raise Fail(
            f"cannot reach the Hugging Face Hub for '{name}', and it is not in the "
            f"datasets cache: check the network, run with HF_HUB_OFFLINE=1 once it is "
            f"cached, or import a local Arrow/Parquet folder"
        ) from None
    return split, builder.hash, data.with_format("arrow").iter(batch_size=1000)


def jsonable(value, column: str):
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v, column) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, column) for v in value]
    if isinstance(value, (dt.date, dt.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, (dt.timedelta, decimal.Decimal)):
        return float(value.total_seconds() if isinstance(value, dt.timedelta) else value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist(), column)
    kind = "binary data (bytes)" if isinstance(value, (bytes, bytearray)) else type(value).__name__
    raise Fail(
        f"column '{column}' holds {kind}, which cannot be written as JSON; "
        f"drop or convert that column first"
    )


def write_atomic(path: Path, lines) -> tuple[int, str]:
    """Write lines to path via a .tmp file; (lines written, sha256 of the bytes)."""
    tmp, digest, count = path.with_name(path.name + ".tmp"), hashlib.sha256(), 0
    try:
        with tmp.open("wb") as handle:
            for count, line in enumerate(lines, start=1):
                handle.write(data := line.encode("utf-8") + b"\n")
                digest.update(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count, digest.hexdigest()


def run(args: argparse.Namespace) -> str:
    import datasets

    out, path = Path(args.out), Path(args.source).expanduser()
    if out.suffix != ".jsonl":
        raise Fail(f"--out {out}: must end in .jsonl")
    if path.exists():
        if path.is_file() and path.suffix != ".parquet":
            raise Fail(f"{args.source}: not a Parquet file (files must end in .parquet)")
        saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
        kind = "arrow" if saved else "parquet"
        if args.config or args.revision:
            raise Fail(f"{args.source}: --config and --revision are for Hub ids, not local data")
        split, revision, batches = (open_arrow if saved else open_parquet)(path, args.split)
    elif (
        args.source.startswith((".", "/", "~"))
        or args.source.count("/") > 1
        or args.source.endswith(".parquet")
    ):
        raise Fail(f"{args.source}: no such file or folder")
    else:
        kind = "hub"
        split, revision, batches = open_hub(
            args.source, args.config, args.split, args.revision, args.limit
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = itertools.islice((row for batch in batches for row in batch.to_pylist()), args.limit)
    count, sha = write_atomic(
        out,
        (
            json.dumps({k: jsonable(v, k) for k, v in row.items()}, ensure_ascii=False)
            for row in rows
        ),
    )
    sidecar = {
        "source": args.source,
        "kind": kind,
        "config": args.config,
        "split": split,
        "revision_requested": args.revision,
        "revision": revision,
        "rows": count,
        "limit": args.limit,
        "sha256": sha,
        "datasets_version": datasets.__version__,
        "command": args.command,
    }
    meta = out.with_name(out.name[: -len(".jsonl")] + ".source.json")
    write_atomic(meta, [json.dumps(sidecar, indent=1)])
    return f"import_data: {count} rows from {kind} {args.source} ({split or '-'}) -> {out}; {meta}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="Hub id, save_to_disk folder, or Parquet file/folder")
    parser.add_argument("--out", required=True, help="data/raw/NAME.jsonl")
    parser.add_argument("--split", help="split to import (default: train)")
    parser.add_argument("--config", help="Hub config (subset) name")
    parser.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    parser.add_argument("--limit", type=int, help="import the first N rows only")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "scripts/import_data.py", *argv])  # however it was run
    try:
        print(run(args))
    except Fail as err:
        sys.exit(f"error: {err}")
    except (OSError, ValueError) as err:  # unreadable files, unknown ids, Arrow type errors
        sys.exit(f"error: {args.source}: {type(err).__name__}: {str(err).splitlines()[0]}")


if __name__ == "__main__":
    main()

"""import_data: Arrow and Parquet folders (and the Hub, offline) into data/raw, JSONL + sidecar."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import import_data  # noqa: E402

from stages.common.kinds import detect_kind  # noqa: E402
from stages.common.records import read_file, resolve_paths  # noqa: E402

TRAIN = [
    {
        "instruction": f"Sort ticket {i}",
        "input": "ça coûte 5 €" if i % 2 else "",
        "output": f'{{"urgency": "low", "n": {i}}}',
    }
    for i in range(5)
]
TEST = [{"instruction": "Reply", "input": "", "output": "ok"}]


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/import_data.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


def importing(*args: str) -> None:
    import_data.main(list(args))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def saved_dict(tmp_path: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_list(TRAIN), test=Dataset.from_list(TEST)).save_to_disk(
        str(tmp_path / "saved")
    )
    return tmp_path / "saved"


def test_datasetdict_folder_becomes_alpaca_jsonl_with_a_sidecar(saved_dict, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    importing("saved", "--out", "data/raw/tickets.jsonl")  # default split: train
    out, meta = Path("data/raw/tickets.jsonl"), Path("data/raw/tickets.source.json")
    assert jsonl(out) == TRAIN
    assert list(jsonl(out)[0]) == ["instruction", "input", "output"]  # key order as in the source
    side = json.loads(meta.read_text())
    assert side["source"] == "saved" and side["kind"] == "arrow" and side["split"] == "train"
    assert side["config"] is None and side["rows"] == 5
    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert side["revision"].startswith("sha256:") and len(side["revision"]) == 7 + 64
    assert side["datasets_version"] == __import__("datasets").__version__
    assert side["command"] == "python scripts/import_data.py saved --out data/raw/tickets.jsonl"
    assert not list(Path("data/raw").glob("*.tmp"))

    first = out.read_bytes(), meta.read_bytes()
    importing("saved", "--out", "data/raw/tickets.jsonl")
    assert (out.read_bytes(), meta.read_bytes()) == first  # deterministic

    # the repo's own reader and kind detection take it as alpaca; a *.jsonl glob skips the sidecar
    rows = read_file(out)
    assert [r["parse_error"] for r in rows] == [None] * 5
    assert detect_kind([r["obj"] for r in rows])[0] == "alpaca"
    assert resolve_paths("data/raw/*.jsonl") == [out]

    importing("saved", "--split", "test", "--out", "data/raw/test.jsonl")
    assert jsonl(Path("data/raw/test.jsonl")) == TEST


def test_parquet_folder_rows_come_in_sorted_file_order(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(TRAIN[2:]), "pq/b.parquet")  # written first, read second
    pq.write_table(pa.Table.from_pylist(TRAIN[:2]), "pq/a.parquet")
    importing("pq", "--out", "raw/x.jsonl")
    assert jsonl(Path("raw/x.jsonl")) == TRAIN
    side = json.loads(Path("raw/x.source.json").read_text())
    assert (side["kind"], side["split"], side["rows"]) == ("parquet", "train", 5)

    pq.write_table(pa.Table.from_pylist(TRAIN[:1]), "pq/a.parquet")  # other content, other hash
    importing("pq", "--limit", "2", "--out", "raw/y.jsonl")
    other = json.loads(Path("raw/y.source.json").read_text())
    assert other["revision"] != side["revision"] and other["rows"] == 2


def test_hub_style_parquet_splits_and_values_made_json(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hub/data").mkdir(parents=True)
    rows = [
        {
            "text": "a",
            "day": dt.date(2024, 2, 29),
            "at": dt.datetime(2024, 1, 1, 12, 30),
            "score": float("nan"),
            "tags": ["x"],
            "meta": {"n": 1},
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), "hub/data/train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "t"}]), "hub/data/test-00000-of-00001.parquet")
    importing("hub", "--out", "a.jsonl")
    assert jsonl(Path("a.jsonl")) == [
        {
            "text": "a",
            "day": "2024-02-29",
            "at": "2024-01-01T12:30:00",
            "score": None,
            "tags": ["x"],
            "meta": {"n": 1},
        }
    ]
    importing("hub", "--split", "test", "--out", "b.jsonl")
    assert jsonl(Path("b.jsonl")) == [{"text": "t"}]


def test_the_datasets_builder_path_streams_a_limit_or_prepares_all(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the Hub path, run on a local folder: same builder calls, no network
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(TRAIN), tmp_path / "pq/train.parquet")
    for limit in (2, None):
        split, revision, batches = import_data.open_hub(
            str(tmp_path / "pq"), None, None, None, limit
        )
        got = [row for batch in batches for row in batch.to_pylist()]
        assert split == "train" and revision and got == TRAIN


def test_missing_split_names_the_available_ones(saved_dict, tmp_path):
    done = cli("saved", "--split", "validation", "--out", "raw/x.jsonl", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: saved: no split 'validation'; available: train, test"
    ]
    assert not (tmp_path / "raw/x.jsonl").exists()


def test_a_column_that_cannot_be_json_is_one_line_and_writes_nothing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"text": "a", "blob": b"\x00\x01"}])
    pq.write_table(table, tmp_path / "b.parquet")
    done = cli("b.parquet", "--out", "raw/x.jsonl", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        (
            "error: column 'blob' holds binary data (bytes), which cannot be written as JSON; "
            "drop or convert that column first"
        )
    ]
    assert not list((tmp_path / "raw").iterdir())  # neither the file nor its .tmp


def test_hub_unreachable_is_one_line_naming_the_id(tmp_path):
    done = cli(
        "no-such-org/no-such-set",
        "--out",
        "raw/x.jsonl",
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'no-such-org/no-such-set'" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and "local Arrow/Parquet folder" in lines[0]


def test_a_bad_path_is_one_line(tmp_path):
    done = cli("./nowhere/data", "--out", "raw/x.jsonl", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["error: ./nowhere/data: no such file or folder"]

"""validate: every record kind from every file format; a corpus of bad inputs where each defect
gets its reason code and line (or, for an unreadable file, a one-line error); counts reconcile;
the gate fails loudly."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import set_params
from helpers import GOOD, GOOD_ROWS, SYSTEM, chat, msgs

from stages import base_model, validate
from stages.common.config import StageError
from stages.common.examples import IGNORE
from stages.common.facts import measure_tokens, role_order_error
from stages.common.files import md5_path, read_jsonl

OTHER = '{"urgency": "low", "category": "account"}'


# kind -> a good record, and the defects of that kind: reason code -> record (dict or raw line)
DEFECTS = {
    "messages": [
        ("malformed_json", '{"messages": [{"role": "user", "content": "cut off'),
        ("invalid_utf8", b'{"messages": "\xff\xfe"}'),
        ("nul_byte", b'{"messages": [\x00]}'),
        ("not_an_object", json.dumps(["a", "list"])),
        ("missing_field", {"conversation": []}),
        ("wrong_type", {"messages": "hello"}),
        ("wrong_type", {"messages": [{"role": "user", "content": 42}]}),
        ("empty_conversation", {"messages": []}),
        ("null_value", {"messages": [SYSTEM, {"role": "user", "content": None}]}),
        ("null_value", {"messages": [SYSTEM, None]}),
        ("message_missing_key", {"messages": [{"role": "user"}]}),
        (
            "message_unrecognized_key",
            {
                "messages": [
                    {"role": "user", "content": "hi", "mood": "x"},
                    {"role": "assistant", "content": GOOD},
                ]
            },
        ),
        ("unknown_role", msgs(("customer", "Hi"), ("assistant", GOOD))),
        ("no_assistant", msgs(("system", "Triage."), ("user", "Hi"))),
        ("bad_role_order", msgs(("user", "a"), ("system", "Triage."), ("assistant", GOOD))),
        ("bad_role_order", msgs(("user", "a"), ("user", "b"), ("assistant", GOOD))),
        ("empty_content", chat(user=" ")),
        ("empty_assistant", chat(answer="  ")),
        ("control_chars", chat(user="charged\u0007 twice")),
        ("replacement_char", chat(user="charged tw\ufffdce")),
        ("special_token_leak", chat(user="charged<|im_end|> twice")),
        ("too_long", chat(user="log line " * 400)),
        ("too_long", chat(user="x" * 200_000)),  # a huge record
        ("answer_format", chat(answer=GOOD + " Hope that helps!")),
        ("label_outside_set", chat(answer='{"urgency": "high", "category": "sales"}')),
        (
            "bad_weight",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": GOOD, "weight": 2},
                ]
            },
        ),
        (
            "zero_trainable_tokens",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": GOOD, "weight": 0},
                ]
            },
        ),
        ("kind_mismatch", GOOD_ROWS["alpaca"]),
        # last: the assertions below index the earlier ones by position
        ("nesting_too_deep", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ("number_too_long", '{"messages": [], "n": ' + "9" * 5000 + "}"),
        ("duplicate_key", '{"messages": [], "messages": []}'),
        ("lone_surrogate", '{"messages": [{"role": "user", "content": "hi \\ud83d"}]}'),
    ],
    "sharegpt": [
        (
            "unknown_role",
            {
                "conversations": [
                    {"from": "human", "value": "hi"},
                    {"from": "narrator", "value": GOOD},
                ]
            },
        ),
        ("message_missing_key", {"conversations": [{"from": "human"}]}),
        ("wrong_type", {"conversations": {"from": "human", "value": "hi"}}),
    ],
    "alpaca": [
        ("missing_field", {"instruction": "Triage.", "input": "hi"}),
        ("null_value", {"instruction": "Triage.", "output": None}),
        ("wrong_type", {"instruction": "Triage.", "output": GOOD, "history": ["not a pair"]}),
        ("empty_content", {"instruction": "   ", "output": GOOD}),
    ],
    "prompt_completion": [
        ("empty_assistant", {"prompt": "I was charged twice.", "completion": ""}),
        ("answer_format", {"prompt": "I was charged twice.", "completion": "billing, high"}),
    ],
    "preference": [
        ("chosen_equals_rejected", {"prompt": "hi", "chosen": GOOD, "rejected": GOOD}),
        ("empty_assistant", {"prompt": "hi", "chosen": GOOD, "rejected": " "}),
        (
            "missing_field",
            {
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "user", "content": "b"}],
            },
        ),
    ],
    "text": [
        ("empty_content", {"text": "  \n "}),
        ("null_value", {"text": None}),
        ("binary_value", {"text": "a scanned page", "blob": b"\x00\x01"}),
    ],
}
# which file format carries each kind's corpus (every format gets at least one kind)
FORMATS = {
    "messages": ".jsonl",
    "sharegpt": ".json",
    "alpaca": ".json",
    "prompt_completion": ".csv",
    "preference": ".jsonl",
    "text": ".parquet",
}


def write_data(path, records: list, suffix: str) -> list[int]:
    """Write records in a format; return the line (row) number of each."""
    if suffix == ".jsonl":
        lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in records]
        # a BOM on the first line and CRLF endings must not cost a record
        data = (
            b"\xef\xbb\xbf"
            + b"\r\n".join(x if isinstance(x, bytes) else x.encode() for x in lines)
            + b"\r\n"
        )
        path.write_bytes(data)
        return list(range(1, len(records) + 1))
    if suffix == ".json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
        return list(range(2, len(records) + 2))
    if suffix == ".csv":
        import csv

        columns = sorted({k for r in records for k in r})
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in records:
                writer.writerow(
                    [v if isinstance(v := r.get(c, ""), str) else json.dumps(v) for c in columns]
                )
        return list(range(2, len(records) + 2))
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for r in records for k in r})
    pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in records] for c in columns}), path)
    return list(range(1, len(records) + 1))


@pytest.fixture
def base(project):
    base_model.main()
    (project / "data/raw/tickets.jsonl").unlink()
    set_params(
        project,
        **{"data.max_rejected_fraction": 0.95, "train.max_length": 128, "data.test_path": None},
    )
    return project


def run(project, kind: str, files: dict[str, list], declared: str | None = None):
    paths = []
    lines = {}
    for name, records in files.items():
        path = project / "data/raw" / name
        lines[name] = write_data(path, records, path.suffix)
        paths.append(f"data/raw/{name}")
    set_params(project, **{"data.path": paths, "data.kind": declared or kind})
    validate.main()
    report = json.loads((project / "reports/validate.json").read_text())
    return lines, report


@pytest.mark.parametrize("kind", list(DEFECTS))
def test_each_defect_gets_its_reason_and_line(base, kind):
    good = GOOD_ROWS[kind]
    defects = DEFECTS[kind]
    records = [good, good | {"note": "kept in meta"}] + [d for _, d in defects]
    name = f"{kind}{FORMATS[kind]}"
    if FORMATS[kind] != ".jsonl":  # raw bytes only make sense in JSON Lines
        records = [r for r in records if isinstance(r, dict)]
        defects = [(reason, d) for reason, d in defects if isinstance(d, dict)]
    lines, report = run(base, kind, {name: records})

    quarantine = {q["line"]: q for q in read_jsonl(base / "data/interim/quarantine.jsonl")}
    for (reason, _), line in zip(defects, lines[name][2:]):
        assert line in quarantine, f"{kind}: {reason} (line {line}) not quarantined"
        assert reason in quarantine[line]["reasons"], (kind, reason, quarantine[line])
        assert quarantine[line]["source"].endswith(name)
    valid = read_jsonl(base / "data/interim/valid.jsonl")
    assert [v["line"] for v in valid] == lines[name][:2]  # the two good rows, nothing else
    assert valid[1]["meta"] == {"note": "kept in meta"}
    assert all(v["kind"] == kind for v in valid)
    # counts reconcile
    assert report["rows_in"] == len(records) == report["rows_out"] + report["rows_quarantined"]
    assert report["rows_quarantined"] == len(quarantine) == len(defects)
    if kind == "messages":  # one defect, one reason: no echo of the same fault under other codes
        assert quarantine[lines[name][2 + 13]]["reasons"] == ["no_assistant"]
        assert quarantine[lines[name][2 + 21]]["reasons"] == ["too_long"]
        assert quarantine[lines[name][2 + 12]]["reasons"] == ["unknown_role"]
        assert quarantine[lines[name][2 + 17]]["reasons"] == ["empty_assistant"]


def test_canonical_shapes(base):
    for kind, shape in [
        ("sharegpt", "messages"),
        ("alpaca", "messages"),
        ("prompt_completion", "messages"),
        ("preference", "chosen"),
        ("text", "text"),
    ]:
        run(base, kind, {f"{kind}{FORMATS[kind]}": [GOOD_ROWS[kind]]})
        (record,) = read_jsonl(base / "data/interim/valid.jsonl")
        assert shape in record and {"id", "source", "line", "kind"} <= set(record), record
        (base / f"data/raw/{kind}{FORMATS[kind]}").unlink()
    # alpaca: instruction and input become one user turn, output the assistant turn
    run(base, "alpaca", {"a.json": [GOOD_ROWS["alpaca"]]})
    (record,) = read_jsonl(base / "data/interim/valid.jsonl")
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["messages"][0]["content"] == "Triage this ticket.\n\nI was charged twice."


def test_auto_detects_kind_per_file_and_reports_drift(base, capsys):
    a = [GOOD_ROWS["alpaca"]] * 2
    b = [GOOD_ROWS["alpaca"] | {"system": "Be brief."}]
    _, report = run(base, "alpaca", {"a.jsonl": a, "b.csv": b}, declared="auto")
    assert report["kinds"] == {"data/raw/a.jsonl": "alpaca", "data/raw/b.csv": "alpaca"}
    assert report["schema_drift"]["data/raw/b.csv"]["extra"] == ["system"]
    assert "detected kind 'alpaca'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "files, message",
    [
        ({"bin.jsonl": b"\x00\x01\x02\x03" * 100}, r"bin.jsonl: looks like a binary file"),
        ({"obj.json": b'{"messages": []}'}, r"obj.json: a .json data file must hold an array"),
        ({"cut.json": b'[{"text": "a"},\n{"text": '}, r"cut.json:2:\d+: not a valid JSON document"),
        ({"notes.txt": b"hello"}, r"notes.txt: unsupported file type"),
        ({"bad.parquet": b"PAR1 not really"}, r"bad.parquet: not a readable Parquet file"),
        ({"dup.csv": b"text,text\na,b\n"}, r"dup.csv:1: CSV header needs unique"),
        ({"latin1.csv": "text\ncaf\xe9\n".encode("latin-1")}, r"latin1.csv: not UTF-8"),
        (
            {
                "a.jsonl": json.dumps(GOOD_ROWS["text"]).encode(),
                "b.jsonl": json.dumps(GOOD_ROWS["alpaca"]).encode(),
            },
            r"mixes record kinds.*a.jsonl: text",
        ),
        (
            {"odd.jsonl": b'{"question": "a", "answer": "b"}'},
            r"odd.jsonl: cannot tell the record kind",
        ),
        ({"empty.jsonl": b""}, r"no records"),
    ],
)
def test_unreadable_files_are_one_line_errors(base, files, message):
    for name, data in files.items():
        (base / "data/raw" / name).write_bytes(data)
    set_params(base, **{"data.path": [f"data/raw/{n}" for n in files], "data.kind": "auto"})
    with pytest.raises(StageError, match=message) as err:
        validate.main()
    assert "\n" not in str(err.value)


def test_empty_file_beside_others_is_reported(base):
    (base / "data/raw/empty.jsonl").write_bytes(b"\n\n")
    _, report = run(base, "messages", {"a.jsonl": [chat()]})
    set_params(base, **{"data.path": ["data/raw/a.jsonl", "data/raw/empty.jsonl"]})
    validate.main()
    report = json.loads((base / "reports/validate.json").read_text())
    assert report["empty_files"] == ["data/raw/empty.jsonl"] and report["rows_out"] == 1


def test_length_policies(base):
    long_answer_last = chat(user="log line " * 100)
    # an earlier answer survives truncation, which keeps the start of a conversation
    long_multi_turn = msgs(
        ("user", "hi"), ("assistant", GOOD), ("user", "log line " * 100), ("assistant", OTHER)
    )
    rows = [chat(), long_answer_last, long_multi_turn]
    _, rejected = run(base, "messages", {"a.jsonl": rows})
    assert rejected["quarantined_by_reason"] == {"too_long": 2}

    set_params(base, **{"data.length_policy": "truncate"})
    validate.main()
    truncated = json.loads((base / "reports/validate.json").read_text())
    assert truncated["quarantined_by_reason"] == {"zero_trainable_tokens": 1}
    assert truncated["truncated"]["rows"] == 1 and truncated["truncated"]["tokens_cut"] > 0
    assert truncated["rows_out"] == 2

    set_params(base, **{"data.length_policy": "drop", "data.max_rejected_fraction": 0.0})
    validate.main()  # dropped rows are written down but do not fail the gate
    dropped = json.loads((base / "reports/validate.json").read_text())
    assert dropped["quarantined_by_reason"] == {"too_long": 2}


def test_gate_fails_with_top_reasons_and_lines(base):
    set_params(base, **{"data.max_rejected_fraction": 0.1})
    with pytest.raises(StageError, match=r"validation gate failed.*a.jsonl:2"):
        run(base, "messages", {"a.jsonl": [chat(), chat(answer="")]})


def test_fatal_reason_fails_on_a_single_row(base):
    set_params(base, **{"data.fatal_reasons": ["invalid_utf8"]})
    with pytest.raises(StageError, match="fatal reasons"):
        run(base, "messages", {"a.jsonl": [chat()] * 5 + [b'{"a": "\xff"}']})


def test_bundled_data_defects_all_caught(project):
    base_model.main()
    validate.main()  # the first 240 lines of data/raw/tickets.jsonl
    report = json.loads((project / "reports/validate.json").read_text())
    assert report["rows_in"] == report["rows_out"] + report["rows_quarantined"]
    assert report["rows_quarantined"] > 0 and report["token_length"]["max"] <= report["max_length"]
    assert (project / "reports/data_docs/index.html").exists()
    # Data Docs are a DVC output: the same data gives the same pages, byte for byte (GX's
    # own pages carry a timestamp and random element ids)
    first = md5_path(project / "reports/data_docs")
    validate.main()
    assert md5_path(project / "reports/data_docs") == first
    pages = [p.read_text() for p in (project / "reports/data_docs").rglob("*.html")]
    assert len(pages) == 3 and not any("?d=20" in page for page in pages)


# (DATA_CHUNK_ROWS, DATA_WORKERS, data.engine): one chunk; many, in two processes; one row
# each; many, as Ray tasks on a local Ray cluster of two CPUs
ENGINE_RUNS = [
    ("100000", "1", "local"),
    ("7", "2", "local"),
    ("1", "1", "local"),
    ("7", "2", "ray"),
]


@pytest.mark.parametrize("length_policy", ["reject", "truncate"])
def test_chunks_and_workers_change_no_output_byte(project, monkeypatch, length_policy):
    """validate streams the rows a chunk at a time (DATA_CHUNK_ROWS) through worker processes
    (DATA_WORKERS) or Ray (data.engine=ray), keeping only their facts in memory: the outputs
    are the same bytes however the rows were cut and shared, and wherever they were worked."""
    base_model.main()
    set_params(project, **{"data.length_policy": length_policy, "train.max_length": "auto"})
    with (project / "data/raw/tickets.jsonl").open("a") as f:  # one row far past the p99
        f.write(json.dumps(chat(user="My invoice is wrong again. " * 300)) + "\n")
    outputs = (validate.VALID, validate.QUARANTINE, validate.REPORT, validate.MAX_LENGTH)
    runs = []
    for chunk_rows, workers, engine in ENGINE_RUNS:
        monkeypatch.setenv("DATA_CHUNK_ROWS", chunk_rows)
        monkeypatch.setenv("DATA_WORKERS", workers)
        set_params(project, **{"data.engine": engine})
        validate.main()
        runs.append(
            {str(p): (project / p).read_bytes() for p in outputs}
            | {"docs": md5_path(project / validate.DATA_DOCS)}
        )
    assert all(run == runs[0] for run in runs[1:])
    report = json.loads(runs[0][str(validate.REPORT)])
    assert report["rows_quarantined"] > 0 and report["rows_out"] > 200
    # the long row: cut at the auto max_length it keeps no answer token, found by measuring
    # it again as training cuts it (under reject it is too_long)
    reason = "zero_trainable_tokens" if length_policy == "truncate" else "too_long"
    assert report["over_max_length"]["rows"] >= 1
    assert report["quarantined_by_reason"][reason] >= 1
    assert not list(project.glob("data/interim/.spool-*"))  # the spool is gone


def test_missing_data_file_is_one_line_error(project):
    set_params(project, **{"data.path": "data/raw/nothing.jsonl"})
    with pytest.raises(StageError, match="nothing.jsonl: no such file"):
        validate.main()


def test_token_counts_are_what_training_trains(base):
    """validate counts each row with the examples train builds: the same tokens, the same
    trained tokens, for every record shape and train_on setting, cut or not."""
    from transformers import AutoTokenizer

    from stages import train

    tokenizer = AutoTokenizer.from_pretrained(base / "models/base")
    template = (base / "models/base/chat_template_training.jinja").read_text()
    records = [
        {
            "messages": [
                SYSTEM,
                {"role": "user", "content": f"ticket {i} " * (i % 7 + 1)},
                {"role": "assistant", "content": GOOD if i % 2 else OTHER},
            ]
        }
        for i in range(30)
    ]
    records.append(
        msgs(("user", "hi"), ("assistant", GOOD), ("user", "and?"), ("assistant", OTHER))
    )
    records.append(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": GOOD, "weight": 0},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": OTHER},
            ]
        }
    )
    records.append(
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": OTHER}],
        }
    )
    records.append({"text": "Refunds take five days. " * 20})
    for train_on in ("assistant", "all"):
        for limit in (None, 40):
            facts = [{"unknown_role": None, "role_order": None, "n_assistant": 1} for _ in records]
            measure_tokens(facts, records, tokenizer, template, train_on, limit)
            whole = train.tokenized_rows(records, tokenizer, train_on, None, packing=False)
            assert [f["n_tokens"] for f in facts] == [len(r["input_ids"]) for r in whole]
            # rows are cut at the limit when training cuts them; raw text is packed, never cut
            expected = [
                sum(
                    label != IGNORE
                    for label in (w["labels"] if "text" in rec else w["labels"][:limit])
                )
                for rec, w in zip(records, whole)
            ]
            assert [f["trainable_tokens"] for f in facts] == expected, (train_on, limit)


def test_sets_in_the_wild(base):
    """Shapes of well-known public sets: Dolly (renamed columns), UltraFeedback (the prompt
    repeated inside chosen/rejected, extra score fields), ShareGPT-style preference."""
    dolly = {
        "instruction": "Triage this.",
        "context": "I was charged twice.",
        "response": GOOD,
        "category": "classification",
    }
    set_params(base, **{"data.columns": {"input": "context", "output": "response"}})
    _, report = run(base, "alpaca", {"dolly.jsonl": [dolly]}, declared="auto")
    (record,) = read_jsonl(base / "data/interim/valid.jsonl")
    assert report["rows_out"] == 1 and record["meta"] == {"category": "classification"}
    assert record["messages"][0]["content"] == "Triage this.\n\nI was charged twice."
    set_params(base, **{"data.columns": {}})

    user = {"role": "user", "content": "I was charged twice."}
    ultrafeedback = {
        "prompt": "I was charged twice.",
        "score_chosen": 9.0,
        "score_rejected": 2.0,
        "chosen": [user, {"role": "assistant", "content": GOOD}],
        "rejected": [user, {"role": "assistant", "content": "sales"}],
    }
    sharegpt_pref = {
        "conversations": [{"from": "human", "value": "I was charged twice."}],
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": "sales"},
    }
    _, report = run(
        base, "preference", {"uf.jsonl": [ultrafeedback, sharegpt_pref]}, declared="auto"
    )
    assert report["rows_out"] == 2, read_jsonl(base / "data/interim/quarantine.jsonl")
    for record in read_jsonl(base / "data/interim/valid.jsonl"):
        assert [m["role"] for m in record["prompt"]] == ["user"]
        assert [m["role"] for m in record["chosen"]] == ["assistant"]


def test_foreign_data_under_the_ticket_task_says_which_task_to_pick(base):
    set_params(base, **{"data.max_rejected_fraction": 0.2})
    foreign = {"instruction": "Summarise.", "output": "A short summary."}
    with pytest.raises(StageError, match="task=generic"):
        run(base, "alpaca", {"a.jsonl": [foreign] * 3})
    generic = yaml.safe_load((base / "conf/task/generic.yaml").read_text())
    set_params(base, task=generic)
    _, report = run(base, "alpaca", {"a.jsonl": [foreign] * 3})
    assert report["rows_out"] == 3


WORDS = [
    "refund",
    "invoice",
    "login",
    "password",
    "parcel",
    "courier",
    "screen",
    "crash",
    "export",
    "report",
    "upgrade",
    "discount",
    "warranty",
    "battery",
    "address",
]


def distinct_rows(kind: str, n: int = 40) -> list[dict]:
    """n good rows of a kind whose requests share no word 3-gram, so dedup keeps them all."""
    rows = []
    for i in range(n):
        words = [f"{WORDS[(i + j * 4) % len(WORDS)]}{i}" for j in range(6)]
        user = "Ticket " + " ".join(words)
        answer = json.dumps(
            {"urgency": ["low", "high"][i % 2], "category": ["billing", "account"][i // 2 % 2]}
        )
        rows.append(
            {
                "messages": chat(user=user, answer=answer),
                "sharegpt": {
                    "conversations": [
                        {"from": "human", "value": user},
                        {"from": "gpt", "value": answer},
                    ]
                },
                "alpaca": {"instruction": "Triage this ticket.", "input": user, "output": answer},
                "prompt_completion": {"prompt": user, "completion": answer},
                "preference": {"prompt": user, "chosen": answer, "rejected": "no idea, sorry"},
                "text": {"text": f"Handbook section {i}: " + " ".join(words) + "."},
            }[kind]
        )
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_kind_from_every_format_through_the_data_stages(base, suffix):
    """A config switch (data.path, data.kind) is all it takes: validate -> dedup -> split."""
    from stages import dedup, split

    set_params(base, **{"data.replay.fraction": 0})  # replay mixes chat only (test_split.py)
    for kind in GOOD_ROWS:
        for old in (base / "data/raw").iterdir():
            old.unlink()
        _, report = run(base, kind, {f"{kind}{suffix}": distinct_rows(kind)})
        assert (report["rows_in"], report["rows_out"]) == (40, 40), (kind, report)
        dedup.main()
        split.main()
        dedup_report = json.loads((base / "reports/dedup.json").read_text())
        split_report = json.loads((base / "reports/split.json").read_text())
        assert dedup_report["rows_in"] == 40 == dedup_report["rows_out"], (kind, dedup_report)
        sizes = {
            name: len(read_jsonl(base / f"data/processed/{name}.jsonl"))
            for name in ("train", "validation", "test")
        }
        assert sum(sizes.values()) == split_report["rows_out"] == 40 and min(sizes.values()) > 0
        assert all(r["kind"] == kind for r in read_jsonl(base / "data/processed/train.jsonl"))


def test_fixed_evaluation_sets_are_validated_and_tagged(base):
    (base / "data/eval").mkdir(exist_ok=True)
    write_data(
        base / "data/eval/test.jsonl", [chat("My parcel never came."), chat(answer="")], ".jsonl"
    )
    set_params(base, **{"data.test_path": "data/eval/test.jsonl"})
    _, report = run(base, "messages", {"pool.jsonl": [chat(), chat("Refund please.")]})
    valid = read_jsonl(base / "data/interim/valid.jsonl")
    assert [r.get("fixed_split") for r in valid] == [None, None, "test"]
    # the same suite: the empty answer of the test file is quarantined with its file and line
    assert report["fixed_sets"] == {
        "test": {"files": ["data/eval/test.jsonl"], "rows_in": 2, "rows_out": 1}
    }
    quarantined = read_jsonl(base / "data/interim/quarantine.jsonl")
    assert [(q["source"], q["line"], q["reasons"]) for q in quarantined] == [
        ("data/eval/test.jsonl", 2, ["empty_assistant"])
    ]


@pytest.mark.parametrize(
    "test_path, message",
    [
        ("data/raw/pool.jsonl", "data.test_path: data/raw/pool.jsonl is also in data.path"),
        ("/tmp", "data.test_path: /tmp is a folder: name its files"),
        ("data/eval/missing.jsonl", "data.test_path: data/eval/missing.jsonl: no such file"),
        (
            "elsewhere.jsonl",
            (
                "data.test_path=elsewhere.jsonl: not a dependency of the validate stage"
                ", so `dvc repro` would not rerun it when the file changes; put it under "
                "data/raw or data/eval"
            ),
        ),
    ],
)
def test_fixed_set_paths_are_checked(base, test_path, message):
    for path in ("data/raw/pool.jsonl", "elsewhere.jsonl"):
        write_data(base / path, [chat()], ".jsonl")
    set_params(base, **{"data.path": "data/raw/pool.jsonl", "data.test_path": test_path})
    with pytest.raises(StageError, match=message):
        validate.main()


def test_max_length_auto_follows_the_data(base):
    ticket = "My card was charged twice. " * 3
    records = [chat(ticket * (1 + i % 4)) for i in range(200)] + [chat(ticket * 40)]
    set_params(base, **{"train.max_length": "auto"})
    _, report = run(base, "messages", {"pool.jsonl": records})
    lengths = report["token_length"]
    # the 99th percentile, rounded up to 64: the one outlier is too long, nothing else
    assert report["max_length"] % 64 == 0
    assert lengths["p99"] <= report["max_length"] < lengths["p99"] + 64
    assert report["quarantined_by_reason"] == {"too_long": 1}
    assert report["max_length_chosen"].startswith("auto: 99th percentile of 201 rows")
    set_params(base, **{"train.max_length": "long"})
    with pytest.raises(StageError, match="train.max_length='long'"):
        validate.main()


def test_what_exports_write_is_read_as_meant(base):
    folder = base / "data/raw/exports"
    folder.mkdir()
    # a key present as null is absent: Parquet and `datasets` exports write every key
    nulls = {
        "messages": [
            {
                "role": "user",
                "content": "Charged twice.",
                "weight": None,
                "tool_calls": None,
                "mood": None,
            },
            {"role": "assistant", "content": GOOD, "weight": None},
        ],
        "extra": None,
    }
    (folder / "nulls.jsonl").write_text(json.dumps(nulls) + "\n")
    # UTF-16 with its byte order mark (Windows' "Unicode" text); CR-only line ends
    (folder / "utf16.jsonl").write_bytes(
        ("\n".join(json.dumps(chat(f"Ticket {i}")) for i in range(3)) + "\n").encode("utf-16")
    )
    (folder / "cr.jsonl").write_bytes(
        "\r".join(json.dumps(chat(f"Old Mac ticket {i}")) for i in range(3)).encode()
    )
    # a CSV cell over csv's default 128 KB field limit is data, not a malformed row
    (folder / "long.csv").write_text(
        'messages\n"' + json.dumps(chat("word " * 30_000)["messages"]).replace('"', '""') + '"\n'
    )
    (folder / "a_folder.jsonl").mkdir()  # a glob's folder is skipped, not read
    set_params(
        base,
        **{"data.path": "data/raw/exports/*", "data.kind": "messages", "train.max_length": None},
    )
    validate.main()
    report = json.loads((base / "reports/validate.json").read_text())
    assert report["files"] == {
        f"data/raw/exports/{name}": n
        for name, n in (("cr.jsonl", 3), ("long.csv", 1), ("nulls.jsonl", 1), ("utf16.jsonl", 3))
    }
    assert report["rows_out"] == 8, read_jsonl(base / "data/interim/quarantine.jsonl")
    valid = read_jsonl(base / "data/interim/valid.jsonl")
    assert "meta" not in valid[4] and "weight" not in valid[4]["messages"][0]
    set_params(base, **{"data.path": "data/raw/exports/a_folder.jsonl"})
    with pytest.raises(StageError, match="a_folder.jsonl is a folder: name its files"):
        validate.main()


def test_a_json_array_too_deep_to_parse_is_a_one_line_error(base):
    (base / "data/raw/deep.json").write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    set_params(base, **{"data.path": "data/raw/deep.json", "data.kind": "messages"})
    with pytest.raises(StageError, match=r"deep.json: not a readable JSON document \(nested"):
        validate.main()


# --- the steps, directly ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "roles, error",
    [
        (["system", "user", "assistant"], None),
        (["user", "assistant", "user", "assistant"], None),
        (["user", "system", "assistant"], "system message not first"),
        (["user", "assistant", "user"], "does not end with an assistant message"),
        (["user", "user", "assistant"], "user and assistant turns do not alternate"),
        (["user", "tool", "assistant"], "tool results must follow"),
    ],
)
def test_role_order_error(roles, error):
    found = role_order_error([{"role": r, "content": "x"} for r in roles])
    assert found == error if error is None else error in found


def test_tool_results_follow_the_call():
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}
    turns = [{"role": "user", "content": "x"}, call, {"role": "tool", "content": "1"}]
    assert role_order_error([*turns, {"role": "assistant", "content": "done"}]) is None


def test_percentiles_and_auto_max_length():
    lengths = list(range(1, 101))
    assert validate.percentiles(lengths) == {
        "min": 1,
        "p50": 51,
        "p95": 96,
        "p99": 100,
        "max": 100,
        "mean": 50.5,
    }
    assert validate.percentiles([]) == {}
    assert validate.auto_max_length(lengths, context=8192)[0] == 128  # p99 100 -> 2 x 64
    assert validate.auto_max_length(lengths, context=96)[0] == 96  # never past the context
    assert validate.auto_max_length([], context=8192)[0] is None


def test_gate_counts_dropped_too_long_rows_only_when_rejected():
    tally = validate.Tally()
    for i in range(3):
        tally.add({"source": "a.jsonl", "line": i, "reasons": ["too_long"]})
    data = {"length_policy": "drop", "fatal_reasons": [], "max_rejected_fraction": 0.1}
    task = type("T", (), {"name": "t"})()
    validate.gate(tally, 10, 900, data, task)  # 30% dropped, by choice: passes
    with pytest.raises(StageError, match=r"30.0% of rows rejected.*a.jsonl:0, a.jsonl:1.*900"):
        validate.gate(tally, 10, 900, {**data, "length_policy": "reject"}, task)
    with pytest.raises(StageError, match=r"fatal reasons \['too_long'\]"):
        validate.gate(tally, 10, 900, {**data, "fatal_reasons": ["too_long"]}, task)


def write_sheet(path, reviewed: list[tuple[dict, str, str]]) -> None:
    """A filled review sheet: (record, verdict, correction) per row."""
    from stages.common import review

    path.parent.mkdir(exist_ok=True)
    rows = [
        {"id": "x", "prompt": json.dumps(r["messages"][:-1]), "verdict": v, "correction": c}
        for r, v, c in reviewed
    ]
    path.write_text(review.sheet_text(rows), encoding="utf-8")


def test_review_corrections_relabel_in_place_or_move_to_train(base):
    """A filled review sheet in data/review/: its verdicts are counted; a correction replaces the
    answer of the record with that prompt (the fixed test row keeps its place, with the right
    reference), or moves it into train; one that matches no record is listed."""
    (base / "data/eval").mkdir(exist_ok=True)
    mislabelled = chat("My parcel never came.")
    write_data(base / "data/eval/test.jsonl", [mislabelled], ".jsonl")
    set_params(base, **{"data.test_path": "data/eval/test.jsonl"})
    write_sheet(
        base / "data/review/alice.csv",
        [
            (mislabelled, "wrong", OTHER),
            (chat("Refund please."), "right", ""),
            (chat("Not in any data set."), "wrong", OTHER),
            (chat(), "", ""),  # not reviewed
            (chat(), "unsure", ""),
        ],
    )
    _, report = run(base, "messages", {"pool.jsonl": [chat(), chat("Refund please.")]})
    valid = read_jsonl(base / "data/interim/valid.jsonl")
    fixed = [r for r in valid if r.get("fixed_split")]
    assert [(r["fixed_split"], r["messages"][-1]["content"]) for r in fixed] == [("test", OTHER)]
    assert fixed[0]["meta"]["review"] == {"sheet": "data/review/alice.csv", "line": 2, "was": GOOD}
    review = report["review"]
    assert review["verdicts"] == {"right": 1, "wrong": 2, "unsure": 1}
    assert (review["reviewed"], review["corrections"], review["records_corrected"]) == (4, 2, 1)
    assert review["unmatched"] == [{"sheet": "data/review/alice.csv", "line": 4}]
    assert review["sheets"] == {"data/review/alice.csv": md5_path(base / "data/review/alice.csv")}

    set_params(base, **{"data.review.corrections": "train"})
    validate.main()
    valid = read_jsonl(base / "data/interim/valid.jsonl")
    assert [r.get("fixed_split") for r in valid if r.get("meta", {}).get("review")] == ["train"]

    set_params(base, **{"data.review.corrections": "off"})
    validate.main()
    valid = read_jsonl(base / "data/interim/valid.jsonl")
    assert [r["messages"][-1]["content"] for r in valid if r.get("fixed_split")] == [GOOD]


@pytest.mark.parametrize(
    "verdict, correction, message",
    [
        ("nope", "", r"alice.csv line 2: verdict 'nope' is not one of right, wrong, unsure"),
        ("right", OTHER, r"alice.csv line 2: a correction needs the verdict `wrong`"),
    ],
)
def test_a_bad_review_row_stops_validate_with_its_line(base, verdict, correction, message):
    write_sheet(base / "data/review/alice.csv", [(chat(), verdict, correction)])
    with pytest.raises(StageError, match=message):
        run(base, "messages", {"pool.jsonl": [chat()]})
    (base / "data/review/alice.csv").write_text("verdict,comment\nright,ok\n")
    with pytest.raises(
        StageError, match=r"alice.csv: not a review sheet \(no column 'correction'\)"
    ):
        run(base, "messages", {"pool.jsonl": [chat()]})

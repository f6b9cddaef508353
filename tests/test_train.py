"""train: loss only on assistant tokens; a LoRA adapter and loss curves come out."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT, set_params
from stages import base_model, train
from stages.common.files import write_jsonl


@pytest.fixture
def prepared(project):
    """models/base from the tiny model, and small processed splits from the bundled data."""
    base_model.main()
    rows = []
    for line in (ROOT / "data/raw/tickets.jsonl").read_text().splitlines()[:80]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        roles = [m.get("role") for m in record.get("messages", [])]
        if roles == ["system", "user", "assistant"] and record["messages"][2]["content"]:
            rows.append({"id": str(len(rows)), "source": "x", "line": len(rows) + 1, **record})
    write_jsonl(project / "data/processed/train.jsonl", rows[:40])
    write_jsonl(project / "data/processed/validation.jsonl", rows[40:48])
    return project


def test_only_assistant_answers_carry_loss(prepared, tmp_path):
    params = yaml_params(prepared)
    trainer = train.build_trainer(params, "fp32", str(tmp_path / "out"))
    tokenizer = trainer.processing_class
    assert len(trainer.train_dataset) == 40  # no row lost to zero trainable tokens
    for example, source in zip(trainer.train_dataset.select(range(5)),
                               (json.loads(line) for line in
                                (prepared / "data/processed/train.jsonl").read_text().splitlines())):
        trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        answer = source["messages"][-1]["content"]
        assert tokenizer.decode(trained) == answer + tokenizer.eos_token


def test_lora_run_writes_adapter_report_and_curves(prepared):
    train.main()
    tuned = prepared / "models/tuned"
    assert (tuned / "adapter_config.json").exists()
    assert (tuned / "adapter_model.safetensors").exists()
    modules = json.loads((tuned / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules)  # byte-stable output, whatever the hash seed
    report = json.loads((prepared / "reports/train.json").read_text())
    assert report["optimizer_steps"] == 4 and report["precision"] == "fp32"
    assert 0 < report["parameters"]["trainable"] < report["parameters"]["total"]
    assert report["eval_loss"] is not None and report["train_loss"] > 0
    train_curve = (prepared / "reports/plots/train_loss.csv").read_text().splitlines()
    eval_curve = (prepared / "reports/plots/eval_loss.csv").read_text().splitlines()
    assert train_curve[0] == "step,loss" and len(train_curve) == 5  # logging_steps=1
    assert len(eval_curve) == 3  # eval_steps=2 over 4 steps


def test_gradient_accumulation_and_full_method(prepared):
    set_params(prepared, **{"method": {"name": "full"}, "train.gradient_accumulation_steps": 2,
                            "train.per_device_train_batch_size": 2, "train.max_steps": 2})
    shutil.rmtree(prepared / "models/tuned", ignore_errors=True)
    train.main()
    report = json.loads((prepared / "reports/train.json").read_text())
    assert report["method"] == "full" and report["optimizer_steps"] == 2
    assert report["parameters"]["trainable"] == report["parameters"]["total"]
    assert (prepared / "models/tuned/model.safetensors").exists()


def yaml_params(root):
    import yaml

    return yaml.safe_load((root / "params.yaml").read_text())


def test_non_chat_records_stop_with_one_line(prepared):
    from stages.common.config import StageError

    write_jsonl(prepared / "data/processed/train.jsonl",
                [{"id": "x", "source": "raw.jsonl", "line": 3, "kind": "text", "text": "hello"}])
    with pytest.raises(StageError, match=r"needs chat records, found a 'text' record \(line 3"):
        train.main()

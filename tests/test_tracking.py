"""tracking: a stage leaves a finished offline W&B run whose config holds its input md5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stages import split
from stages.common.files import md5_file, write_jsonl
from test_split import rows


def read_offline_run(run_dir: Path) -> dict:
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--summary", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_offline_run_has_config_md5_and_summary(project, monkeypatch, tmp_path):
    import wandb

    wandb.teardown()  # earlier tests ran wandb disabled; its settings singleton reads env once
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-that-must-not-leak-0123456789")
    write_jsonl(project / "data/interim/dedup.jsonl", rows(40))
    split.main()

    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    run = read_offline_run(run_dirs[0])
    assert run["state"] == "finished" and run["exit_code"] == 0
    assert run["name"] == "exp-test-split"
    config = run["config"]
    assert config["stage"] == "split"
    assert config["data_md5"]["dedup"] == md5_file(project / "data/interim/dedup.jsonl")
    assert config["params"]["split"]["train"] == 0.8
    assert config["dvc"]["exp_name"] == "exp-test"
    assert run["summary"]["split/train"] == 32
    # the API key never lands in the run's files
    for path in run_dirs[0].rglob("*"):
        if path.is_file():
            assert b"secret-key-that-must-not-leak" not in path.read_bytes(), path

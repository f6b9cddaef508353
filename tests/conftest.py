"""Shared fixtures: the tiny model (built once per session) and a throwaway project copy.

Stages run in-process here (one import of torch/transformers for the whole session); the
end-to-end tests in test_pipeline.py run them through DVC instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model, ticket_corpus  # noqa: E402

# Set before any stage imports wandb/huggingface: no telemetry, nothing in the user's home.
os.environ["WANDB_MODE"] = "disabled"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

TEMPLATE_PATHS = [
    "conf",
    "stages",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
    "requirements",
    "data/general",
    "data/replay",
    "data/redteam",
    "data/review",
]


@pytest.fixture(scope="session", autouse=True)
def _hf_home(tmp_path_factory):
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ["WANDB_DIR"] = str(tmp_path_factory.mktemp("wandb"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    corpus = ticket_corpus(ROOT / "data/raw/tickets.jsonl")
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus)


def copy_template(dest: Path, raw_rows: int | None = 240) -> Path:
    """The template's tracked files, with the first `raw_rows` lines of each bundled data set."""
    for rel in TEMPLATE_PATHS:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # the fixed test set shrinks with the pool: an eighth of its rows
    files = {
        "data/raw/tickets.jsonl": raw_rows,
        "data/raw/tickets_preference.jsonl": raw_rows,
        "data/raw/tickets_text.jsonl": raw_rows,
        "data/eval/tickets_test.jsonl": raw_rows and max(8, raw_rows // 8),
    }
    for name, rows in files.items():
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines(True)
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text("".join(lines[:rows]), encoding="utf-8")
    return dest


def tiny_overrides(model_dir: Path) -> list[str]:
    """Hydra overrides that make the pipeline run in seconds on the tiny model."""
    return [
        f"model.name_or_path={model_dir}",
        "train.max_steps=4",
        "train.eval_steps=2",
        "train.logging_steps=1",
        "train.per_device_train_batch_size=4",
        "train.learning_rate=1e-3",
        "eval.max_examples=8",
        "eval.max_new_tokens=12",
        "data.max_rejected_fraction=0.5",
        "eval.min_safety=null",  # an untrained tiny model passes no red-team check
    ]


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A project copy with params.yaml composed for the tiny model; cwd is its root."""
    from stages.common.compose import compose

    root = copy_template(tmp_path / "project")
    monkeypatch.chdir(root)
    compose(root / "params.yaml", tiny_overrides(tiny_model_dir))
    declare_dependency(root, "base_model", tiny_model_dir)
    return root


def declare_dependency(root: Path, stage: str, path: Path) -> None:
    """Add a file a param names to the stage's deps in the project's dvc.yaml, as a user does
    for a local model folder (stages refuse undeclared ones)."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"][stage]["deps"].append(str(path))
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))


def use_model(root: Path, folder: Path) -> None:
    """Point model.name_or_path at a local model folder, declared as base_model's dependency."""
    set_params(root, **{"model.name_or_path": str(folder)})
    declare_dependency(root, "base_model", folder)


def set_params(root: Path, **updates) -> dict:
    """Edit the project's params.yaml: set_params(root, **{"dedup.threshold": 0.5})."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in updates.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def switch_method(root: Path, name: str, **updates) -> dict:
    """Set the project's method section to what `method=<name>` composes (the schema refuses
    a lora section renamed full), plus `updates` elsewhere in params.yaml."""
    from stages.common.compose import compose

    composed = root / "params.method.yaml"
    compose(composed, [f"method={name}"])
    section = yaml.safe_load(composed.read_text())["method"]
    composed.unlink()
    return set_params(root, method=section, **updates)


@pytest.fixture
def prepared(project):
    """models/base from the tiny model, and small processed splits from the bundled data (no
    validate run, so the length it would choose for max_length=auto is set here)."""
    from helpers import ticket_rows

    from stages import base_model
    from stages.common.files import write_jsonl

    base_model.main()
    set_params(project, **{"train.max_length": 256})
    rows = ticket_rows()
    write_jsonl(project / "data/processed/train.jsonl", rows[:40])
    write_jsonl(project / "data/processed/validation.jsonl", rows[40:48])
    return project

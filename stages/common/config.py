"""Params, paths and the stage entry point.

Stages read the committed `params.yaml` (composed from `conf/` by DVC's Hydra integration),
never `conf/` itself, so `dvc repro` and DVC's params tracking see exactly what ran.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


class StageError(Exception):
    """Bad input or a failed gate: reported as one line, never a traceback."""


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml, checked against the typed schema (stages/common/schema.py) before any work."""
    from stages.common.schema import check

    if not path.exists():
        raise StageError(f"{path}: not found; run stages from the project root")
    try:
        with path.open(encoding="utf-8") as f:
            return check(yaml.safe_load(f))
    except yaml.YAMLError as err:
        raise StageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except ValueError as err:
        raise StageError(f"{path}: {err}") from None


def require_dependency(stage: str, key: str, path: str | Path) -> Path:
    """A file or folder a param names must be a dependency of the stage that reads it (inside
    one of the stage's deps in dvc.yaml); otherwise `dvc repro` would call the stage up to date
    after the file changed. Returns the path; raises StageError naming the param otherwise."""
    path = Path(path)
    pipeline = Path("dvc.yaml")
    if not pipeline.exists():  # a stage run outside a DVC project: nothing to check against
        return path
    deps = yaml.safe_load(pipeline.read_text(encoding="utf-8"))["stages"][stage].get("deps", [])
    target = path.resolve()
    for dep in deps:
        declared = Path(dep).resolve()
        if target == declared or declared in target.parents:
            return path
    folders = [d for d in deps if not str(d).startswith("stages/") and Path(d).is_dir()]
    raise StageError(
        f"{key}={path}: not a dependency of the {stage} stage, so `dvc repro` would "
        f"not rerun it when the file changes; put it under "
        f"{' or '.join(folders) or 'a declared folder'}, or add it to the "
        f"{stage} stage's deps in dvc.yaml"
    )


def project_root() -> Path:
    """The repository the run belongs to: DVC_ROOT under `dvc exp run --queue/--temp`."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def setup_environment() -> None:
    """Process-wide defaults for every stage: offline hubs, no telemetry, quiet logs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Hub downloads only when the user opts in (a hub id in model.name_or_path needs it).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(): a StageError exits 2 with one line naming the cause."""
    setup_environment()
    try:
        main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

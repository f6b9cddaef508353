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
    if not path.exists():
        raise StageError(f"{path}: not found; run stages from the project root")
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


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

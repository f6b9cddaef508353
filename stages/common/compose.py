"""Compose conf/ into params.yaml exactly as `dvc exp run` does (DVC's own function).

    python -m stages.common.compose [override ...]     # e.g. method=full train.max_steps=5

`dvc repro` never composes, so run this (or `make params`) after editing conf/ when you
reproduce with `dvc repro`; `dvc exp run` composes by itself. The result is checked against
the typed schema (stages/common/schema.py): a wrong key or value exits 2 with one line, and
every stage checks params.yaml again when it starts (`dvc exp run` composes without us).
"""

from __future__ import annotations

import sys
from pathlib import Path

CONF_DIR = Path("conf")


def compose(output: Path, overrides: list[str] | None = None) -> None:
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(
        output, str(CONF_DIR.resolve()), None, "config", str(Path.cwd()), overrides or []
    )


if __name__ == "__main__":
    from stages.common.config import StageError, load_params

    compose(Path("params.yaml"), sys.argv[1:])
    try:
        load_params(Path("params.yaml"))
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print("params.yaml composed from conf/" + (f" with {sys.argv[1:]}" if sys.argv[1:] else ""))

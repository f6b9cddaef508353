"""Pipeline stages: one module per DVC stage (`python -m stages.<name>`), see dvc.yaml.

Shared helpers live in `stages.common`; stages never import each other.

Importing this package first checks that the interpreter is the project's: `.venv/bin/dvc`
run without the environment activated starts the stage commands with another python, where
imports fail far from the cause. Standard library only, so the check itself always runs.
"""

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _missing_packages() -> list[str]:
    """The project's pinned dependencies (pyproject.toml) this interpreter does not have."""
    try:
        deps = tomllib.loads(_PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return []  # installed without its pyproject: nothing to compare with
    missing = []
    for dep in deps:
        name = re.split(r"[\[=<>~!; ]", dep, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


if _missing := _missing_packages():
    print(
        f"error: {sys.executable} lacks {', '.join(_missing[:5])}"
        f"{f' and {len(_missing) - 5} more' if len(_missing) > 5 else ''}: not the project's "
        f"environment; activate it (`source .venv/bin/activate`) or run through make "
        f"(`make repro`, `make install` to create it)",
        file=sys.stderr,
    )
    sys.exit(2)

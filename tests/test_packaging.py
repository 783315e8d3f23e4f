"""The project installs as one package (`-e .` in requirements.txt) with the pins requirements.txt
lists: pyproject.toml's dependencies and its test extra are exactly those pins, and its version is
the engine's."""
from __future__ import annotations

from pathlib import Path

import pytest

import alignit_core

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _requirements() -> list[str]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


def test_pyproject_pins_the_same_packages_as_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = project["dependencies"] + project["optional-dependencies"]["test"]
    assert sorted(pinned) == sorted(r for r in _requirements() if r != "-e .")
    assert _requirements()[-1] == "-e ."  # the project itself, after its pinned dependencies


def test_the_package_version_is_the_engines():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == alignit_core.__version__

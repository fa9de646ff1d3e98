"""The wheel lists its packages by hand (the schema folders are mapped into it),
so a new sub-package or schema folder that is not listed would be missing from
a non-editable install while every test here, run from the source tree, passes."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _listed() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return set(tomllib.load(fh)["tool"]["setuptools"]["packages"])


def test_every_subpackage_is_in_the_wheel():
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "scarletstore").rglob("__init__.py")}
    assert found and found <= _listed(), sorted(found - _listed())


def test_every_schema_folder_is_in_the_wheel():
    folders = {f"scarletstore._schemas.{p.name}" for p in (ROOT / "schemas").iterdir()
               if p.is_dir() and any(p.glob("v*.json"))}
    assert folders and folders <= _listed(), sorted(folders - _listed())

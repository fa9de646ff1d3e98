"""The README's Python examples run as written (on the reference data), so a
renamed module or a changed signature cannot break them silently."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from conftest import DATA, shared_file

README = Path(__file__).resolve().parent.parent / "README.md"
# the README is read from the repository root, where the data is ../shared/data
README_DATA = "../shared/data/"


def python_blocks() -> list[str]:
    """Every ```python block of the README, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def run_block(code: str) -> dict:
    """Execute ``code`` as a script (its own namespace) and return the namespace."""
    namespace = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    pipeline = [b for b in blocks if "deblend_exposure" in b]
    reading = [b for b in blocks if "xr.open_dataset" in b]
    assert len(pipeline) == 1 and len(reading) == 1, "README examples not found"
    code = pipeline[0]
    for name in re.findall(re.escape(README_DATA) + r"([\w.]+)", code):
        shared_file(name)  # skips cleanly only when the data really is absent
    code = code.replace(README_DATA, f"{DATA}/")
    monkeypatch.chdir(tmp_path)  # the example writes cosmos.h5 in the current directory
    ns = run_block(code)
    store = ns["store"]
    assert store.runs() and store.check(deep=True) == []
    # the first example reads a product of a store named field.h5
    import scarletstore as ss

    ss.copy_store("cosmos.h5", "field.h5")
    ns = run_block(reading[0])
    assert "image" in ns["exposure"]
    ns["exposure"].close()

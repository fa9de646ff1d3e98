"""The pipeline's commands run on the core dependencies alone.

`make demo` installs only the `sim` and `plot` extras, and a user who installs
the package bare must be able to coadd, detect, deblend, measure and force
without the optional extras; the tests themselves run with every extra
installed, so a command that imports an optional package passes here unless
it is checked: the coadd's scratch streaming imported dask.array, which was
then only in the `dask` extra, and `make demo` failed on a fresh machine.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = r"""
import json, sys

# every installed package outside the core dependencies, as if not installed: a
# None entry makes `import x` fail and importlib.util.find_spec("x") answer
# None, so libraries that try them and carry on without (dask tries
# distributed, dask.widgets jinja2) behave as on a bare install
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None
from scarletstore.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        raise SystemExit(f"{argv[0]} exited {code}")
print(json.dumps(sorted({m.split('.')[0] for m, mod in sys.modules.items() if mod is not None})))
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _core_closure() -> set[str]:
    """The core dependencies and everything they require (without extras)."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        todo = [_name(r) for r in tomllib.load(fh)["project"]["dependencies"]]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if "extra ==" not in r]
    return seen


def _not_core(core: set[str]) -> list[str]:
    """Top-level modules of every installed distribution the core dependencies do not pull in."""
    return sorted(m for m, dists in md.packages_distributions().items()
                  if not {d.lower().replace("_", "-") for d in dists} & (core | {"scarletstore"})
                  and m not in sys.stdlib_module_names)


def test_pipeline_commands_import_only_core_dependencies(tmp_path):
    pytest.importorskip("galsim")  # to make the visits; the commands themselves must not need it
    from scarletstore.simulate.visits import simulate_visits

    sim = tmp_path / "visits"
    simulate_visits(sim, n_visits=2, size=96, seed=3, bands="gr")
    visits = sorted(str(p) for p in sim.glob("visit_*.fits"))
    store, out = str(tmp_path / "field.h5"), tmp_path
    commands = [["coadd", store, *visits, "--grid", str(sim / "grid.fits"), "--bands", "g,r"],
                ["detect", store], ["deblend", store, "--run", "scarlet"],
                ["catalog", store, "--band", "r", "-o", str(out / "cat.fits")],
                ["forced", store, *visits, "-o", str(out / "forced.fits")]]
    core = _core_closure()
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(commands),
                           json.dumps(_not_core(core))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # and nothing else was imported (a package outside the core that a library found anyway)
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    owners = md.packages_distributions()
    foreign = {m: owners[m] for m in modules if m in owners and m not in sys.stdlib_module_names
               and not {d.lower().replace("_", "-") for d in owners[m]} & (core | {"scarletstore"})}
    assert not foreign, f"imported by the commands but not installed by the core dependencies: {foreign}"

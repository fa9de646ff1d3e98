"""Process start-up: load scipy's BLAS/LAPACK tables for numba without scipy.linalg.

numba's CPU target, set up when a process first calls (or loads from the
cache) any kernel, imports ``numba.np.arraymath``, which checks for BLAS by
``import scipy.linalg.cython_blas``. Importing that extension module first
runs ``scipy/linalg/__init__.py``, which imports all of scipy.linalg (and
scipy's array-API layer): 0.15-0.2 s CPU of every CLI call, for two tables
of function pointers no kernel here uses (numba reads them only to call
BLAS from np.dot and np.linalg in compiled code).

:func:`preload_cython_blas` loads the two extension modules themselves
(``cython_blas``, ``cython_lapack``: ~4 ms) from scipy's installed files under
their own names, so numba's import finds them in ``sys.modules`` and a
kernel calling BLAS gets the very same function pointers. A later
``import scipy.linalg`` still runs in full and works as usual; only the
attributes ``scipy.linalg.cython_blas``/``cython_lapack`` are then missing
(``import scipy.linalg.cython_blas`` still returns the module).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

_MODULES = ("cython_blas", "cython_lapack")


def preload_cython_blas() -> bool:
    """Load scipy.linalg's cython_blas/cython_lapack without scipy.linalg; True if done.

    Does nothing (False) when scipy.linalg or numba's target is already
    imported, when scipy is missing, or when the extension files are not
    where scipy keeps them; numba then imports scipy.linalg as usual.
    """
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return False
    try:
        import scipy
    except ImportError:
        return False
    folder = os.path.join(os.path.dirname(scipy.__file__), "linalg")
    found = {}
    for name in _MODULES:
        files = [os.path.join(folder, name + s) for s in importlib.machinery.EXTENSION_SUFFIXES]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            return False
        found[name] = files[0]
    for name, path in found.items():
        full = f"scipy.linalg.{name}"
        if full in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except Exception:  # an unusual build: leave it to the normal import
            del sys.modules[full]
            return False
    return True


#: commands whose first run compiles numba kernels (tens of seconds, once per install)
COMPILING_COMMANDS = frozenset({"simulate", "ingest", "detect", "deblend", "catalog", "coadd",
                                "forced", "tract", "apcorr", "show"})


def kernels_cached() -> bool:
    """Whether the deblender's numba kernels have a cache on disk (``__pycache__`` beside
    the package, or ``NUMBA_CACHE_DIR``): the first call of a fresh install compiles them
    (about a minute of the README example, 0.7 s warm), and a user saw no reason for it."""
    from pathlib import Path

    here = Path(__file__).parent / "deblend"
    places = [here / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        places.append(Path(os.environ["NUMBA_CACHE_DIR"]))
    return any(next(p.rglob("kernels.*.nbi"), None) is not None for p in places if p.is_dir())


def first_run_notice(command: str) -> None:
    """On a terminal, say once that this call compiles the kernels (quiet when piped)."""
    if command in COMPILING_COMMANDS and sys.stderr.isatty() and not kernels_cached():
        sys.stderr.write("scarletstore: first run of this install: compiling numba kernels into "
                         "their cache (about a minute, once)\n")

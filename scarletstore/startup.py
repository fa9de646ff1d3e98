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

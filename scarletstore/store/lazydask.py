"""Keep xarray from importing ``dask.array`` before anything uses dask.

xarray asks "is this a dask array?" whenever it wraps data in a Variable
(every Dataset built from numpy arrays, every vlen-string decode). When dask
is installed, the first such question imports ``dask.array`` to get its
``Array`` class, which pulls in scipy.fft and scipy.sparse: about 0.4 s of
CPU that a command line call without ``--workers`` or ``--scheduler`` pays
for nothing (measured with ``benchmarks/bench_cli.py``).

Likewise every index it builds asks "is this a dask collection?", which
imports ``dask`` itself (~0.08 s) to call ``dask.base.is_dask_collection``.

Both questions have free answers. No dask array can exist before
``dask.array`` does: :func:`install` puts an entry in xarray's cache of
duck-array modules that answers "no type" while ``dask.array`` is absent
from ``sys.modules`` and hands over to xarray's own entry the moment it is
present (or when anything asks for dask's module, version or availability).
And dask's own test answers "no" at once for an object without a callable
``__dask_graph__`` (a numpy array); xarray's check is wrapped to give that
answer without the import. Nothing else changes: dask arrays and
collections are recognised as before (tests/test_h5read.py checks both).

:func:`install` does not import xarray itself (a one-blend deblend and a
catalog never do, see ``store/frame.py``): when xarray is not imported yet,
the probe is put in place the moment its import completes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def install() -> bool:
    """Install the deferred dask probe in xarray now, or as soon as xarray is imported.

    Returns False when xarray's internals differ from what this expects
    (nothing is changed then); True when installed or waiting for the import.
    """
    if "xarray" in sys.modules:
        return _patch()
    if not any(isinstance(f, _AfterXarrayImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterXarrayImport())
    return True


class _AfterXarrayImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps xarray's own loader so :func:`_patch` runs
    right after ``import xarray`` completes (xarray asks its dask questions
    only later, when it builds a Variable)."""

    def find_spec(self, name, path=None, target=None):
        if name != "xarray":
            return None
        sys.meta_path.remove(self)  # one import to watch; and find_spec below must not recurse
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch()

        spec.loader.exec_module = exec_then_patch
        return spec


def _patch() -> bool:
    try:
        from xarray.namedarray import pycompat
    except ImportError:  # pragma: no cover - xarray without namedarray
        return False
    cache = getattr(pycompat, "_cached_duck_array_modules", None)
    base = getattr(pycompat, "DuckArrayModule", None)
    if not isinstance(cache, dict) or base is None:
        return False
    if "dask" in cache:  # xarray already probed (or we did): leave its answer
        return isinstance(cache["dask"], base)

    class _DeferredDask(base):
        """xarray's dask entry, resolved only once dask.array is imported."""

        def __init__(self):  # no import here: that is the point
            pass

        def _resolve(self):
            real = base("dask")
            cache["dask"] = real  # from now on xarray asks its own entry
            return real

        @property
        def type(self):
            if "dask.array" not in sys.modules:
                return ()  # no dask.array module, so no dask array to recognise
            return self._resolve().type

        @property
        def module(self):
            return self._resolve().module

        @property
        def version(self):
            return self._resolve().version

        @property
        def available(self):
            return self._resolve().available

    cache["dask"] = _DeferredDask()
    _defer_collection_test()
    return True


def _defer_collection_test() -> None:
    """Answer xarray's ``is_dask_collection`` for plain objects without importing dask."""
    try:
        from xarray.namedarray import utils
    except ImportError:  # pragma: no cover
        return
    original = getattr(utils, "is_dask_collection", None)
    if original is None or getattr(original, "_scarletstore_deferred", False):
        return

    def is_dask_collection(x):
        # dask.base.is_dask_collection's first test, so the answer is dask's
        if isinstance(x, type) or not callable(getattr(x, "__dask_graph__", None)):
            return False
        return original(x)

    is_dask_collection._scarletstore_deferred = True
    is_dask_collection.__doc__ = original.__doc__
    utils.is_dask_collection = is_dask_collection

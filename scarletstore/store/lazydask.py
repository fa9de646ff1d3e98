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
"""

from __future__ import annotations

import sys


def install() -> bool:
    """Install the deferred dask probe in xarray (once); False when xarray's
    internals differ from what this expects (nothing is changed then)."""
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

"""Catalog columns as lazy xarray variables, measured only when indexed.

Kept apart from :mod:`scarletstore.measure.catalog` because a backend array
has to subclass an xarray class: importing xarray (and pandas with it) costs
0.5-0.6 s of a process, and the command line's catalog writes its table from
plain arrays without it. Only the lazy Datasets (``band_catalog``,
``parent_catalog``) import this module.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from xarray.core import indexing


class LazyColumn(xr.backends.BackendArray):
    """One column of a row cache (anything with ``get(column, rows, dtype)``)."""

    def __init__(self, cache, column: str, dtype, n: int):
        self.cache = cache
        self.column = column
        self.dtype = np.dtype(dtype)
        self.shape = (n,)

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER,
                                                  self._raw)

    def _raw(self, key):
        (k,) = key
        rows = np.arange(self.shape[0])[k]
        scalar = np.ndim(rows) == 0
        values = self.cache.get(self.column, np.atleast_1d(rows), self.dtype)
        return values[0] if scalar else values


def lazy_variable(cache, column: str, dtype, n: int, attrs=None) -> xr.Variable:
    """A ``("row",)`` variable of ``n`` rows whose values ``cache`` measures on demand."""
    return xr.Variable(("row",), indexing.LazilyIndexedArray(LazyColumn(cache, column, dtype, n)),
                       attrs=attrs)

"""Catalog columns as lazy xarray variables, measured only when indexed.

Kept apart from :mod:`scarletstore.measure.catalog` because a backend array
has to subclass an xarray class: importing xarray (and pandas with it) costs
0.5-0.6 s of a process, and the command line's catalog writes its table from
plain arrays without it. Only the lazy Datasets (``band_catalog``,
``parent_catalog``) import this module.
"""

from __future__ import annotations

import copy

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

    def __deepcopy__(self, memo):
        # read-only and backed by open HDF5 files (which cannot be copied): a deep
        # copy of an unloaded catalog measures from the same cache
        return self

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


class MeasurerAttrs(dict):
    """A lazy catalog's attributes, which also answer ``["_measurer"]``.

    The measurer (a :class:`~scarletstore.measure.catalog.BlendMeasurer`)
    holds open h5py files; callers reach it as ``cat.attrs["_measurer"]`` (to
    inspect its reads, close it, use its photometry), but it is not an item:
    xarray deep-copies attributes in ``where``, ``sortby`` and
    ``copy(deep=True)`` and writes them in ``to_netcdf``, and h5py objects
    can be neither copied nor written. A shallow copy (``compute()``,
    ``isel``) keeps the measurer, as it keeps the lazy columns it measures; a
    deep copy or pickle is a plain dict of the items.
    """

    def __init__(self, attrs, measurer):
        super().__init__(attrs)
        self.measurer = measurer

    def __missing__(self, key):
        if key == "_measurer":
            return self.measurer
        raise KeyError(key)

    def __copy__(self):
        return MeasurerAttrs(self, self.measurer)

    def __deepcopy__(self, memo):
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self):
        return dict, (dict(self),)


def with_measurer(ds: xr.Dataset, measurer) -> xr.Dataset:
    """``ds`` with its attributes answering ``["_measurer"]`` (:class:`MeasurerAttrs`)."""
    # the attrs setter (and the constructor) would copy them into a plain dict
    ds._attrs = MeasurerAttrs(ds.attrs, measurer)
    return ds

"""A product held as plain arrays, for the command line's calls that never need xarray.

``import xarray`` costs 0.5-0.6 s of a process on this machine (pandas is
0.3 s of it), a third of what a one-blend ``deblend`` or a one-band
``catalog`` costs from the shell. Those calls only read a few groups'
arrays and attributes, fit, and write one run: nothing xarray does
(alignment, indexes, lazy loading) is used. A :class:`Frame` is that subset
of :class:`xarray.Dataset`'s interface over in-memory numpy arrays:
``frame[name].values``, ``.dims``, ``.attrs``, ``frame.attrs``,
``frame.sizes``, ``frame.variables``, ``frame.coords``, ``frame.data_vars``,
attribute access to a variable (``frame.band``), ``frame[name] = (dims,
values)``, :meth:`~Frame.assign` and :meth:`~Frame.copy`. The code that
reads products (the schema checks, the deblend's task set-up, the run
builder) is written against that subset, so it takes a Frame or a Dataset
alike. :meth:`Frame.to_dataset` gives the Dataset xarray would have built
(variable order, coordinates and attributes included).

Frames are the store's internal currency on those paths only; the public
API (``Store.read``, ``deblend_exposure``, ``store.catalog``) returns
Datasets.
"""

from __future__ import annotations

import numpy as np


class Column:
    """One variable: ``dims`` (tuple of names), ``values`` (numpy array) and ``attrs``."""

    __slots__ = ("dims", "values", "attrs")

    def __init__(self, dims, values, attrs=None):
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        values = np.asarray(values)
        if values.ndim != len(dims):
            raise ValueError(f"{len(dims)} dims {dims} for an array of shape {values.shape}")
        self.dims, self.values, self.attrs = dims, values, dict(attrs or {})

    # the parts of xarray.Variable's interface the package reads
    data = property(lambda self: self.values)
    dtype = property(lambda self: self.values.dtype)
    shape = property(lambda self: self.values.shape)
    ndim = property(lambda self: self.values.ndim)
    size = property(lambda self: self.values.size)
    sizes = property(lambda self: dict(zip(self.dims, self.values.shape)))
    chunks = None  # never a dask array
    encoding: dict = {}  # no storage hints: the store's writers choose the storage

    def __len__(self) -> int:
        return len(self.values)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def copy(self, deep: bool = True) -> "Column":
        return Column(self.dims, self.values.copy() if deep else self.values, dict(self.attrs))

    def __repr__(self) -> str:
        return f"<Column {self.dims} {self.values.dtype} {self.values.shape}>"


def _column(name: str, value, coord: bool = False) -> Column:
    """``value`` as xarray's constructor reads it: a Column, ``(dims, values[, attrs])``,
    or (coordinates only) a bare array along the dimension of the same name."""
    if isinstance(value, Column):
        return value
    if isinstance(value, tuple):
        return Column(*value)
    if coord:
        return Column((name,), value)
    raise TypeError(f"variable {name!r}: give (dims, values) or a Column")


class Frame:
    """A product as in-memory arrays with :class:`xarray.Dataset`'s reading interface.

    Parameters
    ----------
    data_vars, coords : dict, optional
        ``name -> (dims, values[, attrs])`` or :class:`Column`; a coordinate
        may also be a bare array along the dimension of its own name.
    attrs : dict, optional
        The product's attributes.
    """

    def __init__(self, data_vars=None, coords=None, attrs=None):
        # xarray's order: data variables as given, then coordinates
        self._vars: dict[str, Column] = {k: _column(k, v) for k, v in (data_vars or {}).items()}
        self._coords: list[str] = []
        for k, v in (coords or {}).items():
            self._vars[k] = _column(k, v, coord=True)
            self._coords.append(k)
        self.attrs: dict = dict(attrs or {})
        self._check_sizes()

    def _check_sizes(self) -> None:
        sizes = {}
        for name, col in self._vars.items():
            for dim, n in zip(col.dims, col.shape):
                if sizes.setdefault(dim, n) != n:
                    raise ValueError(f"variable {name!r}: dimension {dim!r} has length {n}, "
                                     f"elsewhere {sizes[dim]}")

    # ------------------------------------------------------------ reading
    @property
    def variables(self) -> dict:
        return dict(self._vars)

    @property
    def coords(self) -> dict:
        return {k: self._vars[k] for k in self._vars if self._is_coord(k)}

    @property
    def data_vars(self) -> dict:
        return {k: v for k, v in self._vars.items() if not self._is_coord(k)}

    def _is_coord(self, name: str) -> bool:
        # as in xarray: named coordinates, and every variable along a dimension of its own name
        return name in self._coords or self._vars[name].dims == (name,)

    @property
    def sizes(self) -> dict:
        out = {}
        for col in self._vars.values():
            for dim, n in zip(col.dims, col.shape):
                out.setdefault(dim, n)
        return out

    dims = sizes

    def __getitem__(self, name: str) -> Column:
        try:
            return self._vars[name]
        except KeyError:
            raise KeyError(f"no variable {name!r}") from None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._vars[name]
        except KeyError:
            raise AttributeError(f"'Frame' object has no attribute {name!r}") from None

    def __contains__(self, name) -> bool:
        return name in self._vars

    def __iter__(self):
        return iter(self.data_vars)  # like a Dataset: its data variables

    def __len__(self) -> int:
        return len(self.data_vars)

    # ------------------------------------------------------------ building
    def __setitem__(self, name: str, value) -> None:
        self._vars[name] = _column(name, value)
        self._check_sizes()

    def assign(self, **variables) -> "Frame":
        """A shallow copy with ``variables`` (``name=(dims, values)``) added or replaced."""
        out = self.copy(deep=False)
        for name, value in variables.items():
            out[name] = value
        return out

    def set_coords(self, names) -> "Frame":
        out = self.copy(deep=False)
        out._coords += [n for n in ([names] if isinstance(names, str) else names) if n not in out._coords]
        return out

    def copy(self, deep: bool = False) -> "Frame":
        """A copy: new attribute dicts always (as ``Dataset.copy``), new arrays with ``deep``."""
        out = Frame.__new__(Frame)
        out._vars = {k: v.copy(deep) for k, v in self._vars.items()}
        out._coords = list(self._coords)
        out.attrs = dict(self.attrs)
        return out

    def load(self) -> "Frame":
        return self

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @classmethod
    def from_dataset(cls, ds) -> "Frame":
        """The Frame of an in-memory :class:`xarray.Dataset` (values loaded, order kept)."""
        coords = set(ds.coords)
        out = cls(attrs=dict(ds.attrs))
        for name, var in ds.variables.items():
            out._vars[name] = Column(var.dims, np.asarray(var.values), dict(var.attrs))
            if name in coords:
                out._coords.append(name)
        return out

    def to_dataset(self):
        """The :class:`xarray.Dataset` holding the same variables (in the same order),
        coordinates and attributes."""
        import xarray as xr

        ds = xr.Dataset({k: xr.Variable(v.dims, v.values, v.attrs) for k, v in self._vars.items()},
                        attrs=dict(self.attrs))
        # a variable along its own dimension is already an (index) coordinate
        named = [k for k in self._coords if self._vars[k].dims != (k,)]
        return ds.set_coords(named) if named else ds

    def __repr__(self) -> str:
        return f"<Frame {self.sizes} vars={list(self._vars)}>"


def as_dataset(ds):
    """``ds`` as an :class:`xarray.Dataset` (a Frame converted, a Dataset as it is)."""
    return ds.to_dataset() if isinstance(ds, Frame) else ds

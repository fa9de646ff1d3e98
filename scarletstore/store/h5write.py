"""Write a :class:`~scarletstore.store.frame.Frame` as the group xarray would write.

The counterpart of :mod:`scarletstore.store.h5read`: a one-blend ``deblend``
writes its run without importing xarray (0.5-0.6 s, see ``frame.py``). The
groups the package writes need only the few steps of xarray's netCDF-4
encoding that change anything for them, done here with h5netcdf's own API
(the library xarray's h5netcdf backend calls, in the same order):

* the group's attributes, then its dimensions in order of first use over the
  variables, then each variable: created with its dims, no fill value, and
  the storage its encoding asks (``zlib``/``complevel`` -> gzip,
  ``chunksizes`` -> chunks, ``shuffle``), its attributes set, its values
  written;
* booleans stored as int8 with the attribute ``dtype: "bool"`` (xarray's
  BooleanCoder);
* unicode arrays and object arrays of ``str`` (and empty object arrays,
  which the store's encoding declares strings) as variable-length UTF-8
  strings.

Anything else (fill values or other CF attributes, non-dimension coordinates,
fixed-length or non-string objects, non-native byte order, attribute types
xarray would check differently, dask arrays) makes :func:`writable` say no
and the caller writes the group through xarray, so what is on disk is always
xarray's. tests/test_write_path.py compares the two writers' HDF5 layouts
object for object on the products a Frame can carry.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np

from .frame import Frame

# storage keys of the store's encodings, as xarray's h5netcdf backend maps them
_STORAGE = frozenset({"zlib", "complevel", "shuffle", "chunksizes", "_FillValue", "dtype"})


def _attr_ok(value) -> bool:
    """Attribute values whose netCDF encoding is h5netcdf's alone (xarray passes them through)."""
    if isinstance(value, (bool, np.bool_)):
        return False  # xarray refuses or converts booleans: its path decides
    if isinstance(value, (str, Integral, Real, np.integer, np.floating)):
        return True
    return isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf" \
        and value.dtype.isnative


def _strings(values: np.ndarray) -> bool:
    if values.dtype.kind == "U":
        return True  # xarray stores unicode arrays as variable-length strings too
    return values.dtype.kind == "O" and all(isinstance(v, str) for v in values.ravel().tolist())


def writable(frame, encoding: dict) -> bool:
    """Whether :func:`write_frame` writes ``frame`` exactly as xarray would."""
    if not isinstance(frame, Frame):
        return False
    if not all(isinstance(k, str) and _attr_ok(v) for k, v in frame.attrs.items()):
        return False
    for name, col in frame.variables.items():
        if frame._is_coord(name) and col.dims != (name,):
            return False  # a non-dimension coordinate: CF "coordinates" attributes
        if set(encoding.get(name, {})) - _STORAGE or encoding.get(name, {}).get("_FillValue", None) is not None:
            return False
        values = col.values
        if values.dtype.kind in "biuf":
            if not values.dtype.isnative:
                return False
        elif not _strings(values):
            return False
        if any(k.startswith("_") or k in ("dtype", "coordinates") or not _attr_ok(v)
               for k, v in col.attrs.items()):
            return False
    return True


def _require_group(root, path: str):
    """Open or create each level of ``path`` (as xarray's ``_nc4_require_group``)."""
    group = root
    for key in path.strip("/").split("/"):
        group = group.groups[key] if key in group.groups else group.create_group(key)
    return group


def _storage(col, enc: dict) -> dict:
    """h5netcdf's create_variable arguments for ``enc`` (xarray's mapping; none for scalars)."""
    if not col.shape:
        return {}
    out = {}
    if enc.get("zlib", False):
        out["compression"] = "gzip"
        if enc.get("complevel", 0):
            out["compression_opts"] = enc["complevel"]
    if "shuffle" in enc:
        out["shuffle"] = enc["shuffle"]
    out["chunks"] = enc.get("chunksizes")
    return out


def write_frame(root, name: str, frame: Frame, encoding: dict) -> None:
    """Write ``frame`` as group ``name`` of the open ``h5netcdf.File`` ``root``.

    Call only when :func:`writable` is true. ``encoding`` maps variable names to
    the store's storage settings (``_encoding`` / ``_product_encoding``).
    """
    import h5py

    group = _require_group(root, name)
    for key, value in frame.attrs.items():
        group.attrs[key] = value
    for col in frame.variables.values():
        for dim, n in zip(col.dims, col.shape):
            if dim not in group.dimensions:
                group.dimensions[dim] = n
    for vname, col in frame.variables.items():
        values, attrs = col.values, dict(col.attrs)
        if values.dtype.kind == "b":
            values, attrs["dtype"] = values.astype("i1"), "bool"
            dtype = values.dtype
        elif values.dtype.kind in "OU":
            dtype = h5py.special_dtype(vlen=str)
            values = values.astype(object)
        else:
            dtype = values.dtype
        var = group.create_variable(vname, dimensions=col.dims, dtype=dtype, fillvalue=None,
                                    **_storage(col, encoding.get(vname, {})))
        for key, value in attrs.items():
            var.attrs[key] = value
        var[...] = values

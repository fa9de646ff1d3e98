"""Read a store group straight from HDF5 into the Dataset xarray would build.

``xarray.open_dataset(file, group=g, engine="h5netcdf", mask_and_scale=False,
decode_times=False).load()`` looks every HDF5 object up dozens of times
through h5netcdf and runs each variable through the CF decoding pipeline:
about 0.1 s for a parents group of 30 variables, most of a command's read
time. The groups the store writes hold only what that pipeline leaves
nearly untouched (native numbers, booleans stored as int8 with ``dtype:
"bool"``, variable-length UTF-8 strings, dimension scales), so
:func:`read_group` reads each object once with h5py and applies those few
decodings itself.

Anything else (fill values, scale factors, fixed-length or character
strings, enums, unlimited or phony dimensions, non-native byte order,
``_nc4_non_coord_`` names) makes it return None and the caller uses xarray:
the result is then xarray's by construction. tests/test_h5read.py compares
both readers on every product the package writes, in both store layouts.
The Datasets are identical (values, dtypes, dims, coordinates, indexes,
attributes and their types); only ``encoding`` (xarray's record of the HDF5
storage) is left empty: the store's writers set their own storage.
"""

from __future__ import annotations

import h5py
import numpy as np

from .frame import Column, Frame
from .schema import _h5_dims

# attributes h5netcdf keeps to itself (netCDF-4 and HDF5 dimension-scale bookkeeping)
_HIDDEN = frozenset({"REFERENCE_LIST", "CLASS", "DIMENSION_LIST", "NAME", "_Netcdf4Dimid",
                     "_Netcdf4Coordinates", "_nc3_strict", "_NCProperties"})
_NOT_A_VARIABLE = b"This is a netCDF dimension but not a netCDF variable"
_UNSUPPORTED = object()  # marker: an attribute this reader does not decode like xarray


def _attr(value):
    """One HDF5 attribute as h5netcdf + xarray return it, or ``_UNSUPPORTED``."""
    if isinstance(value, str):  # variable-length string
        return value
    if isinstance(value, bytes):  # fixed-length string: both decode it
        return value.decode("ascii") if value.isascii() else _UNSUPPORTED
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.ndim != 1:
            return _UNSUPPORTED
        # netCDF writes a scalar as a one-element array; h5netcdf unwraps it
        return value[0] if value.shape[0] == 1 else value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value  # a scalar dataspace
    return _UNSUPPORTED


def _attrs(obj) -> dict | None:
    """Visible attributes of ``obj`` decoded, or None when one is not supported."""
    out = {}
    for key in obj.attrs:
        if key in _HIDDEN:
            continue
        if key.startswith("_"):  # _FillValue, _Unsigned, _Encoding, ...: CF decoding
            return None
        value = _attr(obj.attrs[key])
        if value is _UNSUPPORTED:
            return None
        out[key] = value
    return out


def _data(obj, boxes=None) -> np.ndarray | None:
    """All values of an h5py dataset as xarray decodes them, or None.

    With ``boxes`` (``(y0, x0, height, width)`` each) a numeric dataset whose
    last two dimensions are the image's is read only inside those boxes
    (h5py reads just the chunks they touch); every other value is zero.
    """
    if obj.shape is None:  # an empty (null) dataspace
        return None
    if boxes is not None:
        out = np.zeros(obj.shape, obj.dtype)  # calloc: untouched pages cost nothing
        for y0, x0, h, w in boxes:
            box = (Ellipsis, slice(y0, y0 + h), slice(x0, x0 + w))
            out[box] = obj[box]
        return out
    info = h5py.check_string_dtype(obj.dtype)
    if info is not None:
        if info.length is not None:  # fixed-length strings: character-array decoding
            return None
        # h5netcdf decodes variable-length strings, xarray then casts them to str
        return np.asarray(obj.asstr()[()], dtype=object).astype(str)
    if obj.dtype.kind not in "biuf" or not obj.dtype.isnative:
        return None
    return np.asarray(obj[()])


def _dimensions(group) -> tuple[dict, dict] | None:
    """``({dim id: name}, {name: length})`` of the group's dimension scales."""
    ids, sizes = {}, {}
    for key, obj in group.items():
        if not isinstance(obj, h5py.Dataset) or obj.attrs.get("CLASS") != b"DIMENSION_SCALE":
            continue
        if obj.ndim != 1 or obj.maxshape[0] is None:  # unlimited: h5netcdf pads to the dim
            return None
        if "_Netcdf4Dimid" in obj.attrs:
            ids[int(np.ravel(obj.attrs["_Netcdf4Dimid"])[0])] = key
        sizes[key] = obj.shape[0]
    return ids, sizes


def read_group(group, raw: dict | None = None, boxes=None):
    """The product in the open h5py group ``group``, fully in memory, as an
    :class:`xarray.Dataset` (see :func:`read_frame`; arguments and None alike)."""
    frame = read_frame(group, raw, boxes)
    return None if frame is None else frame.to_dataset()


def read_frame(group, raw: dict | None = None, boxes=None) -> Frame | None:
    """The product in the open h5py group ``group``, fully in memory, as a :class:`Frame`.

    Returns the arrays, dims and attributes of the Dataset that
    ``xarray.open_dataset(..., engine="h5netcdf", mask_and_scale=False,
    decode_times=False).load()`` returns for the same group (its
    :meth:`Frame.to_dataset` is that Dataset), or None when the group holds something only xarray decodes (see
    the module notes); errors of the file itself are left to that path too.
    ``raw``, when given, receives the arrays of numeric datasets exactly as
    h5py read them (``dataset[()]``, before any decoding), by name, so a
    checksum of the group need not read them again. ``boxes`` (a list of
    ``(y0, x0, height, width)``) reads the numeric ``(..., y, x)`` variables
    only inside those boxes, zero elsewhere (see :func:`_data`); such arrays
    are not put in ``raw``.
    """
    try:
        return _read(group, raw, boxes)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError):
        return None  # damaged or unusual: xarray's path reports or reads it


def _read(group, raw_out: dict | None = None, boxes=None) -> Frame | None:
    dims_of = _dimensions(group)
    if dims_of is None:
        return None
    dimids, sizes = dims_of
    raw = {}
    for key, obj in group.items():
        if not isinstance(obj, h5py.Dataset):
            continue  # subgroups are not part of the product (xarray skips them too)
        if key.startswith("_nc4_non_coord_"):
            return None
        if _NOT_A_VARIABLE in obj.attrs.get("NAME", b""):
            continue  # a bare dimension
        dims = _h5_dims(obj, dimids)
        if dims is None or any(sizes.get(d) != n for d, n in zip(dims, obj.shape)):
            return None  # phony dims, or a shape that is not its dims' (padding)
        attrs = _attrs(obj)
        if attrs is None:
            return None
        raw[key] = (dims, obj, attrs)
    global_attrs = _attrs(group)
    if global_attrs is None:
        return None
    coord_names = set()
    variables = {}
    for key, (dims, obj, attrs) in raw.items():
        windowed = (boxes is not None and len(dims) >= 2 and dims[-2:] == ("y", "x")
                    and obj.dtype.kind in "biuf" and obj.dtype.isnative)
        data = _data(obj, boxes if windowed else None)
        if data is None:
            return None
        if raw_out is not None and data.dtype.kind in "biuf" and not windowed:
            raw_out[key] = data  # not modified below: the bool decoding makes a copy
        if attrs.get("dtype", False) == "bool":  # xarray's BooleanCoder
            del attrs["dtype"]
            data = data.astype(bool)
        if "coordinates" in attrs:  # CF: the coordinates of a data variable
            coord_names.update(c for c in str(attrs.pop("coordinates")).split() if c in raw)
        variables[key] = Column(dims, data, attrs)
    if isinstance(global_attrs.get("coordinates"), str):
        coord_names.update(global_attrs.pop("coordinates").split())
    coords = {k: v for k, v in variables.items() if k in coord_names or v.dims == (k,)}
    data_vars = {k: v for k, v in variables.items() if k not in coords}
    return Frame(data_vars, coords=coords, attrs=global_attrs)

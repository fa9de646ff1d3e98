"""Versioned schema documents and validation of Datasets against them.

Each product has one JSON document per version in ``schemas/<name>/v<N>.json``.
A document lists the dims, coordinates, variables (dims, dtype, required) and
attributes (type, required, fixed value) of that version.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SchemaError

if TYPE_CHECKING:  # annotations only: checks take Datasets and Frames alike
    import xarray as xr


def _schema_dir() -> Path:
    """The ``schemas/`` documents: the source tree's, else the copy a wheel ships.

    The repository keeps them at top level (one versioned document per
    product); a built wheel carries the same files as ``scarletstore/_schemas``
    (see ``[tool.setuptools]`` in pyproject.toml).
    """
    here = Path(__file__).resolve().parent.parent  # the package folder
    for cand in (here.parent / "schemas", here / "_schemas"):
        if (cand / "exposure").is_dir():
            return cand
    return here.parent / "schemas"


SCHEMA_DIR = _schema_dir()

_ATTR_TYPES = {
    "str": (str,),
    "int": (int, np.integer),
    "float": (float, int, np.floating, np.integer),
}


def known_versions(name: str) -> list[int]:
    """Versions of product ``name`` that have a schema document, ascending."""
    folder = SCHEMA_DIR / name
    if not folder.is_dir():
        return []
    return sorted(int(p.stem[1:]) for p in folder.glob("v*.json") if p.stem[1:].isdigit())


def latest_version(name: str) -> int:
    versions = known_versions(name)
    if not versions:
        raise SchemaError(f"no schema documents for product {name!r}")
    return versions[-1]


@lru_cache(maxsize=None)
def load_schema(name: str, version: int | None = None) -> dict:
    """The schema document of ``name`` at ``version`` (latest when None)."""
    if version is None:
        version = latest_version(name)
    path = SCHEMA_DIR / name / f"v{int(version)}.json"
    if not path.is_file():
        raise SchemaError(f"unknown schema {name!r} version {version}")
    with open(path) as f:
        return json.load(f)


def _dtype_ok(actual: np.dtype, expected: str) -> bool:
    if expected == "str":
        return actual.kind in "UO"
    if expected == "bool":
        return actual.kind == "b" or actual == np.dtype("int8")
    return actual == np.dtype(expected)


def stamp(ds: xr.Dataset, name: str, version: int | None = None) -> xr.Dataset:
    """Set the ``schema`` and ``schema_version`` attributes of ``ds`` (in place) and return it."""
    ds.attrs["schema"] = name
    ds.attrs["schema_version"] = int(version if version is not None else latest_version(name))
    return ds


def validate(ds: xr.Dataset, name: str | None = None, version: int | None = None) -> xr.Dataset:
    """Check ``ds`` against a schema; return it unchanged or raise SchemaError.

    ``name`` and ``version`` default to the Dataset's own ``schema`` and
    ``schema_version`` attributes. Errors name the offending variable or attribute.
    """
    name = name or ds.attrs.get("schema")
    if name is None:
        raise SchemaError("dataset has no 'schema' attribute")
    if version is None:
        version = ds.attrs.get("schema_version")
        if version is None:
            raise SchemaError(f"{name}: dataset has no 'schema_version' attribute")
    if not isinstance(name, str) or not known_versions(name):
        raise SchemaError(f"unknown schema {name!r}")
    known = known_versions(name)
    if int(version) > known[-1]:
        raise SchemaError(
            f"{name}: schema version {int(version)} is newer than this scarletstore knows "
            f"(latest {known[-1]}); upgrade scarletstore")
    doc = load_schema(name, int(version))
    for section in ("coords", "variables"):
        for var, spec in doc.get(section, {}).items():
            if var not in ds.variables:
                if spec.get("required", True):
                    raise SchemaError(f"{name} v{version}: missing variable {var!r}")
                continue
            da = ds.variables[var]
            if tuple(da.dims) != tuple(spec["dims"]):
                raise SchemaError(
                    f"{name} v{version}: variable {var!r} has dims {tuple(da.dims)}, "
                    f"expected {tuple(spec['dims'])}")
            if "dtype" in spec and not _dtype_ok(da.dtype, spec["dtype"]):
                raise SchemaError(
                    f"{name} v{version}: variable {var!r} has dtype {da.dtype}, expected {spec['dtype']}")
    where = f"{name} v{version}"
    _check_attrs(where, doc, dict(ds.attrs))
    check_layout(name, int(version), lambda v: ds[v].values, dict(ds.sizes))
    return ds


# CF contiguous ragged arrays of each product: (count variable, the dim it counts).
# Readers slice flat arrays with the running sums of these counts, so a count that
# disagrees with its dim's length sends them past the end or into a neighbour.
RAGGED = {
    "run": (("blend_n_sources", "source"), ("source_n_components", "component"),
            ("component_n_pixels", "pixel")),
    "parents": (("span_count", "span"), ("peak_count", "peak")),
}


def check_layout(name: str, version: int, get, sizes: dict) -> None:
    """Cross-variable checks of the count variables (no scan of the large arrays).

    Parameters
    ----------
    name, version : the product's schema
    get : callable
        ``get(variable) -> ndarray`` reading one (small) variable.
    sizes : dict
        Length of every dim of the group.

    Raises SchemaError naming the first inconsistency.
    """
    where = f"{name} v{version}"
    for var, dim in RAGGED.get(name, ()):
        counts = np.asarray(get(var))
        if counts.size and int(counts.min()) < 0:
            raise SchemaError(f"{where}: {var!r} has negative counts")
        total, n = int(counts.sum(dtype=np.int64)), int(sizes.get(dim, 0))
        if total != n:
            raise SchemaError(f"{where}: sum of {var!r} is {total} but dim {dim!r} has length {n}")
    if name == "run":
        ctype = np.asarray(get("component_type"))
        if ctype.size and not np.isin(ctype, (0, 1)).all():
            raise SchemaError(f"{where}: 'component_type' holds values other than 0 and 1")
        h = np.asarray(get("component_height"), np.int64)
        w = np.asarray(get("component_width"), np.int64)
        expected = h * w * np.where(ctype == 1, int(sizes.get("band", 0)), 1)
        bad = np.flatnonzero(np.asarray(get("component_n_pixels")) != expected)
        if bad.size:
            raise SchemaError(f"{where}: 'component_n_pixels' of component {int(bad[0])} is not "
                              "its height x width (x bands for a cube)")
    if name == "parents":
        owner = np.repeat(np.asarray(get("parent_id")), np.asarray(get("peak_count")))
        if not np.array_equal(owner, np.asarray(get("peak_parent"))):
            raise SchemaError(f"{where}: 'peak_parent' disagrees with 'peak_count'")


def _attr_value(value):
    """HDF5 attribute -> Python value (netCDF writes scalars as 1-element arrays)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _h5_dims(obj, dimids: dict):
    """netCDF dims of an h5py dataset, or None when they cannot be told.

    netCDF-4 writers record each variable's dims as dim ids
    (``_Netcdf4Coordinates``) beside the dimension-scale references; the ids
    are one attribute read, where dereferencing the scales costs about 1 ms a
    variable, so they are used when present (``dimids``: id -> dim name). The
    lengths are checked against the dims either way, which is what the raw
    readers rely on.
    """
    attrs = obj.attrs
    if attrs.get("CLASS") == b"DIMENSION_SCALE":
        return (obj.name.rsplit("/", 1)[-1],)
    ids = attrs.get("_Netcdf4Coordinates")
    if ids is not None:
        names = tuple(dimids.get(int(i)) for i in np.ravel(ids))
        if None not in names and len(names) == obj.ndim:
            return names
    dims = []
    for axis in obj.dims:
        scales = list(axis.values())
        if not scales:
            return None
        dims.append(scales[-1].name.rsplit("/", 1)[-1])
    return tuple(dims)


def _h5_dtype_ok(obj, expected: str) -> bool:
    import h5py

    if expected == "str":
        return h5py.check_string_dtype(obj.dtype) is not None or obj.dtype.kind in "SU"
    if expected == "bool":
        return obj.dtype == np.dtype("int8") or obj.dtype.kind == "b"
    return obj.dtype == np.dtype(expected)


class NewerSchemaError(SchemaError):
    """A group was written by a newer scarletstore (a schema version this one does not know)."""


def header_of(group) -> tuple[str, int]:
    """``(schema, schema_version)`` of an h5py group, or SchemaError if they are
    missing, unknown or newer than this package."""
    attrs = group.attrs
    name = _attr_value(attrs["schema"]) if "schema" in attrs else None
    if not isinstance(name, str):
        raise SchemaError("group has no 'schema' attribute")
    known = known_versions(name)
    if not known:
        raise SchemaError(f"unknown schema {name!r}")
    version = _attr_value(attrs["schema_version"]) if "schema_version" in attrs else None
    if isinstance(version, (float, np.floating)) and float(version).is_integer():
        version = int(version)
    if not isinstance(version, (int, np.integer)) or isinstance(version, bool):
        raise SchemaError(f"{name}: group has no integer 'schema_version' attribute")
    if version > known[-1]:
        raise NewerSchemaError(
            f"{name}: schema version {int(version)} is newer than this scarletstore knows "
            f"(latest {known[-1]}); upgrade scarletstore")
    if version not in known:
        raise SchemaError(f"{name}: unknown schema version {int(version)}")
    return name, int(version)


def validate_h5(group) -> tuple[str, int]:
    """Check an h5py group written by the store against its schema without reading
    any large array: attributes, presence, dtype and dims of every variable, one
    length per dim, and the ragged counts against the lengths they count.

    Returns ``(schema, schema_version)``; raises SchemaError naming the problem.
    """
    import h5py

    name, version = header_of(group)
    where = f"{name} v{version}"
    doc = load_schema(name, version)
    sizes, objs = {}, {}
    datasets = [(k, o) for k, o in group.items() if isinstance(o, h5py.Dataset)]
    dimids = {}
    for key, obj in datasets:
        if obj.attrs.get("CLASS") == b"DIMENSION_SCALE" and "_Netcdf4Dimid" in obj.attrs:
            dimids[int(np.ravel(obj.attrs["_Netcdf4Dimid"])[0])] = key
    for key, obj in datasets:
        dims = _h5_dims(obj, dimids)
        if dims is None or len(dims) != obj.ndim:
            raise SchemaError(f"{where}: variable {key!r} has no netCDF dimensions")
        for dim, n in zip(dims, obj.shape):
            if sizes.setdefault(dim, n) != n:
                raise SchemaError(f"{where}: variable {key!r} has length {n} along {dim!r}, "
                                  f"other variables {sizes[dim]}")
        objs[key] = (obj, dims)
    for section in ("coords", "variables"):
        for var, spec in doc.get(section, {}).items():
            if var not in objs:
                if spec.get("required", True):
                    raise SchemaError(f"{where}: missing variable {var!r}")
                continue
            obj, dims = objs[var]
            if dims != tuple(spec["dims"]):
                raise SchemaError(f"{where}: variable {var!r} has dims {dims}, "
                                  f"expected {tuple(spec['dims'])}")
            if "dtype" in spec and not _h5_dtype_ok(obj, spec["dtype"]):
                raise SchemaError(f"{where}: variable {var!r} has dtype {obj.dtype}, "
                                  f"expected {spec['dtype']}")
    attrs = {k: _attr_value(v) for k, v in group.attrs.items()}
    _check_attrs(where, doc, attrs)
    check_layout(name, version, lambda v: group[v][()], sizes)
    return name, version


def _check_attrs(where: str, doc: dict, attrs: dict) -> None:
    for attr, spec in doc.get("attrs", {}).items():
        if attr not in attrs:
            if spec.get("required", True):
                raise SchemaError(f"{where}: missing attribute {attr!r}")
            continue
        value = attrs[attr]
        types = _ATTR_TYPES.get(spec.get("type", ""), (object,))
        if not isinstance(value, types):
            raise SchemaError(
                f"{where}: attribute {attr!r} is {type(value).__name__}, expected {spec['type']}")
        if "value" in spec and value != spec["value"]:
            raise SchemaError(f"{where}: attribute {attr!r} is {value!r}, expected {spec['value']!r}")
        if spec.get("description", "").startswith("JSON"):  # readers json.loads these
            try:
                json.loads(value)
            except (TypeError, ValueError):
                raise SchemaError(f"{where}: attribute {attr!r} is not valid JSON") from None

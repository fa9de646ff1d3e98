"""Versioned schema documents and validation of Datasets against them.

Each product has one JSON document per version in ``schemas/<name>/v<N>.json``.
A document lists the dims, coordinates, variables (dims, dtype, required) and
attributes (type, required, fixed value) of that version.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import SchemaError

def _schema_dir() -> Path:
    """The ``schemas/`` documents: the source tree's, else the copy a wheel ships.

    The repository keeps them at top level (one versioned document per
    product); a built wheel carries the same files as ``scarletstore/_schemas``
    (see ``[tool.setuptools]`` in pyproject.toml).
    """
    here = Path(__file__).resolve().parent
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
    known = known_versions(name)
    if known and int(version) > known[-1]:
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
    for attr, spec in doc.get("attrs", {}).items():
        if attr not in ds.attrs:
            if spec.get("required", True):
                raise SchemaError(f"{name} v{version}: missing attribute {attr!r}")
            continue
        value = ds.attrs[attr]
        types = _ATTR_TYPES.get(spec.get("type", ""), (object,))
        if not isinstance(value, types):
            raise SchemaError(
                f"{name} v{version}: attribute {attr!r} is {type(value).__name__}, expected {spec['type']}")
        if "value" in spec and value != spec["value"]:
            raise SchemaError(f"{name} v{version}: attribute {attr!r} is {value!r}, expected {spec['value']!r}")
    return ds

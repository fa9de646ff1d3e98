import numpy as np
import pytest
import xarray as xr

from scarletstore.errors import SchemaError
from scarletstore.schema import known_versions, load_schema, stamp, validate


def _exposure():
    ds = xr.Dataset(
        {
            "image": (("band", "y", "x"), np.zeros((2, 4, 5), np.float32)),
            "variance": (("band", "y", "x"), np.ones((2, 4, 5), np.float32)),
            "mask": (("band", "y", "x"), np.zeros((2, 4, 5), np.int32)),
            "psf": (("band", "psf_y", "psf_x"), np.ones((2, 3, 3), np.float32) / 9),
        },
        coords={"band": np.array(["g", "r"], dtype=object)},
        attrs={"wcs": "", "origin_y": 0, "origin_x": 0, "mask_planes": "{}",
               "bad_mask_planes": "[]", "sources": "[]"},
    )
    return stamp(ds, "exposure", 1)


def test_exposure_v1_document():
    assert 1 in known_versions("exposure")
    doc = load_schema("exposure", 1)
    assert doc["name"] == "exposure" and doc["version"] == 1
    assert {"image", "variance", "mask", "psf"} <= set(doc["variables"])


def test_valid_dataset_passes():
    ds = _exposure()
    assert validate(ds) is ds


@pytest.mark.parametrize("var", ["image", "variance", "mask", "psf"])
def test_missing_variable_is_named(var):
    ds = _exposure().drop_vars(var)
    with pytest.raises(SchemaError, match=f"missing variable '{var}'"):
        validate(ds)


def test_wrong_dtype_is_named():
    ds = _exposure()
    ds["image"] = ds["image"].astype(np.float64)
    with pytest.raises(SchemaError, match="'image' has dtype float64"):
        validate(ds)


def test_wrong_dims_are_named():
    ds = _exposure()
    ds["mask"] = (("band", "x", "y"), np.zeros((2, 5, 4), np.int32))
    with pytest.raises(SchemaError, match="'mask' has dims"):
        validate(ds)


def test_missing_and_wrong_attrs():
    ds = _exposure()
    del ds.attrs["wcs"]
    with pytest.raises(SchemaError, match="missing attribute 'wcs'"):
        validate(ds)
    ds = _exposure()
    ds.attrs["origin_y"] = "zero"
    with pytest.raises(SchemaError, match="'origin_y' is str"):
        validate(ds)


def test_newer_version_is_refused():
    ds = _exposure()
    ds.attrs["schema_version"] = 99
    with pytest.raises(SchemaError, match="newer than this scarletstore knows"):
        validate(ds)


def test_unknown_schema():
    ds = _exposure()
    ds.attrs["schema"] = "nonsense"
    with pytest.raises(SchemaError):
        validate(ds)


def test_every_schema_folder_ships_in_the_wheel():
    """pyproject lists each schemas/<product> folder as a package of scarletstore._schemas."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["scarletstore._schemas"] == "schemas"
    folders = {p.name for p in (root / "schemas").iterdir() if p.is_dir()}
    shipped = {p.split(".")[-1] for p in cfg["packages"] if p.startswith("scarletstore._schemas.")}
    assert folders == shipped
    assert all(known_versions(name) for name in folders)

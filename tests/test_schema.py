import numpy as np
import pytest
import xarray as xr

from scarletstore.errors import SchemaError
from scarletstore.store.schema import known_versions, load_schema, stamp, validate


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


def _run(n_sources=2):
    from scarletstore.store.components import Component, SourceResult
    from scarletstore.store.runs import BlendRecord, build_run

    srcs = [SourceResult(k, [Component(np.ones(2, np.float32), np.ones((3, 4), np.float32), 0, 0,
                                       (1.0, 1.0))]) for k in range(n_sources)]
    rec = BlendRecord(index=0, parent_id=1, bbox=(0, 0, 8, 8), peak_ids=np.arange(n_sources),
                      peaks=np.ones((n_sources, 2)), sources=srcs)
    return build_run([rec], ["g", "r"], np.ones((2, 3, 3), np.float32) / 9, np.ones((1, 1), np.float32),
                     name="x", method="scarlet", config_json="{}", package_version="t")


@pytest.mark.parametrize("var,index,by,msg", [
    ("blend_n_sources", 0, 1, "sum of 'blend_n_sources' is 3 but dim 'source' has length 2"),
    ("source_n_components", 1, -1, "sum of 'source_n_components' is 1"),
    ("component_n_pixels", 0, 1, "sum of 'component_n_pixels' is 25 but dim 'pixel' has length 24"),
    ("blend_n_sources", 0, -3, "negative counts"),
])
def test_ragged_counts_must_match_lengths(var, index, by, msg):
    ds = _run()
    assert validate(ds) is ds
    values = ds[var].values.copy()
    values[index] += by
    ds[var] = (ds[var].dims, values)
    with pytest.raises(SchemaError, match=msg.replace("(", r"\(")):
        validate(ds)


def test_pixel_counts_must_match_each_box():
    """Counts that sum right but give one component another's pixels are refused."""
    ds = _run()
    npix = ds["component_n_pixels"].values.copy()
    npix[0], npix[1] = npix[0] + 4, npix[1] - 4
    ds["component_n_pixels"] = ("component", npix)
    with pytest.raises(SchemaError, match="component_n_pixels' of component 0"):
        validate(ds)

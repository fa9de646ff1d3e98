"""A loaded lazy catalog is an ordinary Dataset: it copies, selects, sorts, pickles and writes.

The measurer behind the lazy columns (open h5py files) used to sit in
``attrs["_measurer"]``, so ``where``, ``sortby``, ``copy(deep=True)`` and
``copy.deepcopy`` raised "h5py objects cannot be pickled" and ``to_netcdf``
refused the attribute, even after ``.load()``.
"""

import copy
import pickle
import warnings

import numpy as np
import pytest
import xarray as xr
from test_catalog_unusable_pixels import _store

from scarletstore.cli import main
from scarletstore.measure.catalog import BlendMeasurer, band_catalog
from scarletstore.measure.parents import parent_catalog

Table = pytest.importorskip("astropy.table").Table


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("copy") / "c.h5", np.nan)[0]


def _cli_catalog(store, path, *options) -> dict:
    assert main(["catalog", str(store.path), "--band", "r", *options, "-o", str(path)]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unit spellings astropy does not know
        t = Table.read(path)
    return {c: np.asarray(t[c]) for c in t.colnames}


def _assert_rows(ds, ref, rows):
    assert set(ds.variables) == set(ref)
    for c in ref:
        np.testing.assert_array_equal(ds[c].values, ref[c][rows], err_msg=c)


@pytest.mark.parametrize("parents", [False, True])
def test_loaded_catalog_copies_sorts_and_writes(store, tmp_path, parents):
    ref = _cli_catalog(store, tmp_path / "cli.fits", *(["--parents"] if parents else []))
    cat = (parent_catalog(store, "r") if parents else band_catalog(store, "r")).load()
    everything = np.arange(len(ref["flux"]))
    _assert_rows(cat, ref, everything)
    # the measurer is still reachable, but is not one of the attributes
    assert isinstance(cat.attrs["_measurer"], BlendMeasurer)
    assert "_measurer" not in cat.attrs and all(isinstance(v, (str, int)) for v in cat.attrs.values())

    flux = ref["flux"]
    cut = float(np.median(flux))
    bright = cat.where(cat.flux > cut, drop=True)
    _assert_rows(bright, ref, np.flatnonzero(flux > cut))
    assert bright.sizes["row"] == (flux > cut).sum() > 0
    _assert_rows(cat.sortby("flux"), ref, np.argsort(flux, kind="stable"))

    for twin in (cat.copy(deep=True), copy.deepcopy(cat), pickle.loads(pickle.dumps(cat))):
        _assert_rows(twin, ref, everything)
        assert twin.attrs == cat.attrs  # the serialisable attributes, and not the measurer
        with pytest.raises(KeyError):
            twin.attrs["_measurer"]

    path = tmp_path / "cat.nc"
    cat.to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        _assert_rows(back.load(), ref, everything)
        assert back.attrs == cat.attrs
        assert back["flux"].attrs["units"] == cat["flux"].attrs["units"] == "counts"
    cat.attrs["_measurer"].close()


def test_unloaded_catalog_deep_copy_stays_lazy(store):
    cat = band_catalog(store, "r")
    twin = copy.deepcopy(cat)  # the lazy columns share their (read-only) cache
    assert cat.attrs["_measurer"].decoded == []
    np.testing.assert_array_equal(twin["psf_flux"].values, cat.compute()["psf_flux"].values)
    assert cat.attrs["_measurer"].decoded == [0, 1]  # one measurement of each blend, shared
    cat.attrs["_measurer"].close()

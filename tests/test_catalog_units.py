"""Units from the input to the written catalogs.

Ingest labelled every image "counts" whatever the FITS ``BUNIT`` said (the
simulator writes nJy), and written catalogs kept units only in a JSON
``UNITS`` card: no ``TUNITn`` for FITS readers (astropy saw unit None) and no
``units`` attribute on .h5 variables.
"""

import json
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import gaussian_psf, write_band_fits
from test_catalog_unusable_pixels import _store

from scarletstore.cli import main
from scarletstore.errors import InputError
from scarletstore.ingest.exposure import read_fits_bands
from scarletstore.measure.fits_table import write_fits_table

u = pytest.importorskip("astropy.units")
from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402

FLUXES = ["flux", "flux_err", "flux_err_noise", "flux_err_model", "psf_flux", "psf_flux_err",
          "aperture_flux_6", "aperture_flux_12_err", "kron_flux", "gaap_flux", "gaap_flux_err"]


def _band(path, band, bunit=None):
    rng = np.random.default_rng(len(band))
    img = rng.normal(0, 1, (20, 24)).astype(np.float32)
    header = {} if bunit is None else {"BUNIT": bunit}
    return write_band_fits(path, band, img, np.ones_like(img), np.zeros(img.shape, np.int32),
                           gaussian_psf(), wcs_header=header)


def test_ingest_takes_bunit(tmp_path):
    ex = read_fits_bands([_band(tmp_path / "g.fits", "g", " nJy"), _band(tmp_path / "r.fits", "r", "nJy")],
                         mask_defects=False)
    assert ex["image"].attrs["units"] == "nJy" and ex["variance"].attrs["units"] == "nJy^2"
    ex = read_fits_bands([_band(tmp_path / "g0.fits", "g")], mask_defects=False)  # no BUNIT
    assert ex["image"].attrs["units"] == "counts" and ex["variance"].attrs["units"] == "counts^2"
    ex = read_fits_bands([_band(tmp_path / "g1.fits", "g", "nJy / pix")], mask_defects=False)
    assert ex["variance"].attrs["units"] == "(nJy / pix)^2"
    with pytest.raises(InputError, match="same units"):
        read_fits_bands([tmp_path / "g.fits", _band(tmp_path / "r2.fits", "r", "adu")], mask_defects=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("units")
    return {unit: _store(tmp / f"{unit}.h5", np.nan, units=unit)[0] for unit in ("nJy", "counts")}


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every TUNIT is one astropy understands
        return Table.read(path)


@pytest.mark.parametrize("options", [["--redistribute"], ["--parents"]])
def test_fits_catalog_has_tunit(stores, tmp_path, options):
    out = tmp_path / "nJy.fits"
    assert main(["catalog", str(stores["nJy"].path), "--band", "r", *options, "-o", str(out)]) == 0
    t = _read(out)
    fluxes = [c for c in [*FLUXES, "flux_redistributed"] if c in t.colnames]
    assert len(fluxes) >= (7 if "--parents" in options else 12)
    for c in fluxes:
        assert t[c].unit == u.nJy, c
    assert t["centroid_x"].unit == u.pix and t["kron_radius"].unit == u.pix
    assert t["shape_xx"].unit == u.pix ** 2
    for c in ("parent", "flags"):  # dimensionless: no TUNIT
        assert t[c].unit is None
    if "--parents" not in options:
        assert t["ra"].unit == u.deg and t["ixx"].unit == u.pix ** 2 and t["data_coverage"].unit is None
    # the JSON card stays, with the catalog's own spelling
    assert json.loads(t.meta["UNITS"])["flux"] == "nJy"
    # a store without recorded units: counts, as FITS spells them
    out = tmp_path / "counts.fits"
    assert main(["catalog", str(stores["counts"].path), "--band", "r", *options, "-o", str(out)]) == 0
    t = _read(out)
    assert t["flux"].unit == u.ct and t["psf_flux_err"].unit == u.ct
    assert json.loads(t.meta["UNITS"])["flux"] == "counts"


def test_h5_and_csv_catalogs(stores, tmp_path):
    path = str(stores["nJy"].path)
    h5, csv, fit = tmp_path / "c.h5", tmp_path / "c.csv", tmp_path / "c.fits"
    for out in (h5, csv, fit):
        assert main(["catalog", path, "--band", "r", "-o", str(out)]) == 0
    units = json.loads(_read(fit).meta["UNITS"])
    with h5py.File(h5, "r") as f:
        names = [k for k in f if k != "row"]
        assert names and set(names) == set(units)
        for k in names:
            assert f[k].attrs["units"] == units[k], k
        assert f["psf_flux"].attrs["units"] == "nJy" and f["x"].attrs["units"] == "pixel"
    # CSV: a header of names only (readers expect one), the units are in the FITS and .h5 files
    df = pd.read_csv(csv)
    assert list(df.columns) == _read(fit).colnames
    np.testing.assert_allclose(df["flux"], _read(fit)["flux"])


def test_fits_units_as_astropy_writes_them(tmp_path):
    rng = np.random.default_rng(2)
    cols = {"id": np.arange(5, dtype=np.int64), "flux": rng.normal(size=5), "x": rng.normal(size=5),
            "ixx": rng.normal(size=5).astype(np.float32), "ok": rng.random(5) > 0.5}
    units = {"flux": "nJy", "x": "pix", "ixx": "pix2"}
    header = {"BAND": "r", "UNITS": json.dumps(units)}
    ours, theirs = tmp_path / "ours.fits", tmp_path / "astropy.fits"
    write_fits_table(cols, header, ours, units)
    t = Table(cols)
    for c, text in units.items():
        t[c].unit = text
    t.meta.update(header)
    t.write(theirs)
    with fits.open(ours) as a, fits.open(theirs) as b:
        a.verify("exception")
        assert list(a[1].header) == list(b[1].header)  # TUNITn after TFORMn, as astropy puts them
        for k in b[1].header:
            assert a[1].header[k] == b[1].header[k], k
        assert a[1].header["TUNIT2"] == "nJy" and "TUNIT1" not in a[1].header
    assert ours.read_bytes()[2880 * 2:] == theirs.read_bytes()[2880 * 2:]  # the data, to the byte
    read = _read(ours)
    assert read["flux"].unit == u.nJy and read["ixx"].unit == u.pix ** 2 and read["id"].unit is None


def test_fits_keys_cut_to_8_characters_name_their_attribute(tmp_path):
    """A catalog attribute longer than a FITS key (missing_patches, redistribute,
    sky_coordinates) was cut to MISSING_ / REDISTRI / SKY_COOR with no word of what it was."""
    from astropy.io import fits

    from scarletstore.measure.catalog import write_columns

    path = tmp_path / "t.fits"
    write_columns({"a": np.arange(3.0)}, {"band": "r", "redistribute": 1, "missing_patches": "[]",
                                          "sky_coordinates": "wcs", "units": '{"a": "1"}'}, path)
    cards = {c.keyword: c for c in fits.getheader(path, 1).cards}
    assert cards["MISSING_"].comment == "missing_patches" and cards["MISSING_"].value == "[]"
    assert cards["REDISTRI"].comment == "redistribute" and cards["REDISTRI"].value == 1
    assert cards["SKY_COOR"].comment == "sky_coordinates" and cards["BAND"].comment == ""

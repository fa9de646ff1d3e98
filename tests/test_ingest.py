import json

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS
from conftest import gaussian_psf, make_wcs_header, store_bytes, write_band_fits

from scarletstore.cli import main
from scarletstore.errors import InputError
from scarletstore.ingest.exposure import bad_pixels, read_fits_bands, read_npz
from scarletstore.store.store import Store


def run(argv):
    return main([str(a) for a in argv])


def test_fits_roundtrip_bit_identical_with_wcs(tmp_path, fits_bands):
    paths, arrays, hdr = fits_bands
    store = tmp_path / "s.h5"
    assert run(["ingest", store, *paths]) == 0
    with xr.open_dataset(Store(store).product_path("exposure"), group="exposure", engine="h5netcdf") as ds:
        assert list(ds.band.values) == ["g", "r", "i"]
        for i, band in enumerate("gri"):
            image, variance, mask, psf = arrays[band]
            np.testing.assert_array_equal(ds["image"].values[i], image)
            np.testing.assert_array_equal(ds["variance"].values[i], variance)
            np.testing.assert_array_equal(ds["mask"].values[i], mask)
            assert ds["psf"].values[i].sum() == pytest.approx(1.0, abs=1e-6)
            np.testing.assert_allclose(ds["psf"].values[i], psf / psf.sum(), rtol=1e-6, atol=1e-8)
        w_in = WCS(hdr)
        w_out = WCS(fits.Header.fromstring(ds.attrs["wcs"]))
        pix = np.array([[0, 0], [10.5, 20.25], [49, 39]])
        np.testing.assert_allclose(w_out.all_pix2world(pix, 0), w_in.all_pix2world(pix, 0), atol=1e-12)
        planes = json.loads(ds.attrs["mask_planes"])
        assert planes == {"BAD": 0, "SAT": 1, "DETECTED": 5}
        # only bad planes make bad pixels: DETECTED is informational
        bad = bad_pixels(ds)
        assert bad[:, 5, 5:9].all() and bad.sum() == 3 * 4


def test_bands_in_given_order(tmp_path, fits_bands):
    paths, arrays, _ = fits_bands
    ds = read_fits_bands(paths[::-1])
    assert list(ds.band.values) == ["i", "r", "g"]
    np.testing.assert_array_equal(ds["image"].values[0], arrays["i"][0])


def test_bands_option_and_psf_option(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 20)).astype(np.float32)
    var = np.ones_like(img)
    a = write_band_fits(tmp_path / "a.fits", "x", img, var, np.zeros((20, 20)), None, band_in_header=False)
    b = write_band_fits(tmp_path / "b.fits", "x", img, var, np.zeros((20, 20)), gaussian_psf(7), band_in_header=False)
    psf_file = tmp_path / "psf.fits"
    fits.PrimaryHDU(gaussian_psf(9, 2.0).astype(np.float32) * 5).writeto(psf_file)
    ds = read_fits_bands([a, b], bands=["r", "i"], psf_files={"r": psf_file})
    assert list(ds.band.values) == ["r", "i"]
    assert ds["psf"].shape == (2, 9, 9)  # padded to the larger PSF
    np.testing.assert_allclose(ds["psf"].values[0].sum(), 1.0, rtol=1e-6)


def test_npz_roundtrip_bit_identical(tmp_path, hsc_path):
    store = tmp_path / "hsc.h5"
    assert run(["ingest", store, hsc_path]) == 0
    data = np.load(hsc_path)
    with xr.open_dataset(Store(store).product_path("exposure"), group="exposure", engine="h5netcdf") as ds:
        np.testing.assert_array_equal(ds["image"].values, data["images"])
        np.testing.assert_array_equal(ds["variance"].values, data["variance"])
        np.testing.assert_array_equal(ds["mask"].values, data["mask"])
        assert list(ds.band.values) == [str(f) for f in data["filters"]]
        np.testing.assert_allclose(ds["psf"].values, data["psfs"] / data["psfs"].sum(axis=(1, 2))[:, None, None],
                                   rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(ds["known_x"].values, data["catalog"]["x"])
        np.testing.assert_array_equal(ds["known_y"].values, data["catalog"]["y"])
        assert ds.attrs["wcs"] == ""


# ------------------------------------------------------------------ bad inputs
def _bad(tmp_path, capsys, argv, match):
    store = tmp_path / "bad.h5"
    code = run(["ingest", store, *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and match in err, err
    assert not store.exists()
    assert not list(tmp_path.glob(".bad.h5*.tmp"))
    return err


def _band(tmp_path, name, shape=(20, 20), variance=None, psf="ok", band=None, image=None, hdus=None):
    img = np.zeros(shape, np.float32) if image is None else image
    var = np.ones(shape, np.float32) if variance is None else variance
    p = gaussian_psf(7) if isinstance(psf, str) else psf
    path = write_band_fits(tmp_path / f"{name}.fits", band or name, img, var, np.zeros(shape), p)
    if hdus is not None:
        with fits.open(path) as h:
            fits.HDUList([x for x in h if x.name not in hdus]).writeto(path, overwrite=True)
    return path


def test_bad_shapes(tmp_path, capsys):
    a, b = _band(tmp_path, "g"), _band(tmp_path, "r", shape=(20, 21))
    err = _bad(tmp_path, capsys, [a, b], "shape")
    assert "r.fits" in err


def test_bad_variance(tmp_path, capsys):
    var = np.ones((20, 20), np.float32)
    var[3, 3] = np.nan
    _bad(tmp_path, capsys, [_band(tmp_path, "g", variance=var)], "non-finite variance")
    var[3, 3] = -1
    _bad(tmp_path, capsys, [_band(tmp_path, "g", variance=var)], "negative variance")


def test_bad_variance_on_masked_pixel_is_fine(tmp_path):
    var = np.ones((20, 20), np.float32)
    var[3, 3] = np.nan
    mask = np.zeros((20, 20), np.int32)
    mask[3, 3] = 1
    p = write_band_fits(tmp_path / "g.fits", "g", np.zeros((20, 20)), var, mask, gaussian_psf(7))
    assert run(["ingest", tmp_path / "ok.h5", p]) == 0


@pytest.mark.parametrize("psf,match", [
    (np.ones((6, 6)), "odd-sized"),
    (np.zeros((5, 5)), "positive sum"),
    (np.zeros((0, 5)), "empty"),
])
def test_bad_psf(tmp_path, capsys, psf, match):
    _bad(tmp_path, capsys, [_band(tmp_path, "g", psf=psf)], match)


def test_duplicate_bands(tmp_path, capsys):
    a, b = _band(tmp_path, "g"), _band(tmp_path, "g2", band="g")
    _bad(tmp_path, capsys, [a, b], "duplicate band")


def test_unreadable_and_non_fits(tmp_path, capsys):
    junk = tmp_path / "junk.fits"
    junk.write_text("this is not FITS")
    err = _bad(tmp_path, capsys, [junk], "not a readable FITS file")
    assert "junk.fits" in err
    _bad(tmp_path, capsys, [tmp_path / "missing.fits"], "no such file")


@pytest.mark.parametrize("hdu", ["IMAGE", "MASK", "VARIANCE", "PSF"])
def test_missing_hdu(tmp_path, capsys, hdu):
    _bad(tmp_path, capsys, [_band(tmp_path, "g", hdus={hdu})], f"missing HDU {hdu}")


def test_npz_without_images(tmp_path, capsys):
    p = tmp_path / "x.npz"
    np.savez(p, variance=np.ones((2, 5, 5)))
    _bad(tmp_path, capsys, [p], "no 'images'")
    q = tmp_path / "y.npz"
    q.write_text("not a zip")
    _bad(tmp_path, capsys, [q], "not a readable npz")


def test_existing_store_unchanged(tmp_path, capsys, fits_bands):
    paths, _, _ = fits_bands
    store = tmp_path / "s.h5"
    assert run(["ingest", store, *paths]) == 0
    before = store_bytes(store)
    assert run(["ingest", store, *paths]) == 2
    assert "already holds an exposure" in capsys.readouterr().err
    assert store_bytes(store) == before


def test_read_npz_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError):
        read_npz(tmp_path / "nope.npz")


def test_simulated_six_band_fits_ingest_exactly(tmp_path):
    pytest.importorskip("galsim")
    from scarletstore.simulate.field import simulate_field

    out = simulate_field(tmp_path / "sim", size=64, seed=2, bands="ugrizy")
    store = tmp_path / "sim.h5"
    assert run(["ingest", store, *out["bands"].values()]) == 0
    with xr.open_dataset(Store(store).product_path("exposure"), group="exposure", engine="h5netcdf") as ds:
        assert list(ds.band.values) == list("ugrizy")
        for i, (band, path) in enumerate(out["bands"].items()):
            with fits.open(path) as h:
                np.testing.assert_array_equal(ds["image"].values[i], h["IMAGE"].data)
                np.testing.assert_array_equal(ds["variance"].values[i], h["VARIANCE"].data)
                np.testing.assert_array_equal(ds["mask"].values[i], h["MASK"].data)
                w_in = WCS(h["IMAGE"].header)
        w_out = WCS(fits.Header.fromstring(ds.attrs["wcs"]))
        pix = np.array([[0.0, 0.0], [31.5, 12.25]])
        np.testing.assert_allclose(w_out.all_pix2world(pix, 0), w_in.all_pix2world(pix, 0), atol=1e-12)


# ------------------------------------------------------------------ inputs that look fine but are wrong
def _wcs_band(tmp_path, name, shift=(0.0, 0.0), ltv=None, wcs=True, psf=None):
    rng = np.random.default_rng(len(name) + int(shift[0] * 10))
    hdr = make_wcs_header(30, 40) if wcs else None
    if wcs:
        hdr["CRPIX1"] += shift[1]
        hdr["CRPIX2"] += shift[0]
    path = write_band_fits(tmp_path / f"{name}.fits", name, rng.normal(0, 1, (30, 40)),
                           np.ones((30, 40)), np.zeros((30, 40)),
                           gaussian_psf(9, 1.5) if psf is None else psf, hdr)
    if ltv is not None:
        with fits.open(path) as h:
            h["IMAGE"].header["LTV1"], h["IMAGE"].header["LTV2"] = -ltv[1], -ltv[0]
            h.writeto(path, overwrite=True)
    return path


def test_zero_variance_band_is_refused(tmp_path, capsys):
    ok = _band(tmp_path, "g")
    err = _bad(tmp_path, capsys, [ok, _band(tmp_path, "r", variance=np.zeros((20, 20), np.float32))],
               "variance is zero on every unmasked pixel")
    assert "band r" in err


def test_fully_masked_band_is_refused(tmp_path, capsys):
    mask = np.ones((20, 20), np.int32)  # BAD everywhere
    p = write_band_fits(tmp_path / "r.fits", "r", np.zeros((20, 20)), np.ones((20, 20)), mask, gaussian_psf(7))
    _bad(tmp_path, capsys, [_band(tmp_path, "g"), p], "every pixel is masked")


@pytest.mark.parametrize("second, match", [
    (dict(shift=(0.0, 3.0)), "different pixel grid"),
    (dict(shift=(0.5, 0.0)), "different pixel grid"),  # half a pixel is a different grid too
    (dict(wcs=False), "has no WCS"),
    (dict(ltv=(100, 200)), "pixel origin"),
])
def test_bands_on_different_grids_are_refused(tmp_path, capsys, second, match):
    err = _bad(tmp_path, capsys, [_wcs_band(tmp_path, "g"), _wcs_band(tmp_path, "r", **second)], match)
    assert "r.fits" in err and "common grid" in err


def test_bands_on_one_grid_are_accepted(tmp_path, capsys):
    store = tmp_path / "ok.h5"
    assert run(["ingest", store, _wcs_band(tmp_path, "g"), _wcs_band(tmp_path, "r", shift=(0.001, 0.0))]) == 0
    assert capsys.readouterr().err == ""


def test_off_centre_psf_is_refused(tmp_path, capsys):
    corner = np.zeros((9, 9))
    corner[:3, :3] = gaussian_psf(3, 0.8)  # all the light in a corner
    err = _bad(tmp_path, capsys, [_band(tmp_path, "g", psf=corner)], "PSF centroid")
    assert "(-3.00, -3.00)" in err
    shifted = np.roll(gaussian_psf(11, 1.5), 2, axis=1)  # two pixels off: a wrong stamp
    _bad(tmp_path, capsys, [_band(tmp_path, "g", psf=shifted)], "PSF centroid")


def test_psf_sum_far_from_one_is_renormalised_with_one_warning(tmp_path, capsys):
    store = tmp_path / "ok.h5"
    psf = 5 * gaussian_psf(9, 1.5)
    assert run(["ingest", store, _band(tmp_path, "g", psf=psf), _band(tmp_path, "r")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "g.fits" in err[0] and "PSF sums to 5" in err[0] and "renormalised" in err[0]
    from scarletstore.store.store import Store
    stored = Store(store).read("exposure")["psf"].values
    np.testing.assert_allclose(stored.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(stored[0], gaussian_psf(9, 1.5), atol=1e-7)


def test_zero_size_image_is_refused(tmp_path, capsys):
    p = tmp_path / "empty.npz"
    np.savez(p, images=np.zeros((2, 0, 10), np.float32), variance=np.ones((2, 0, 10), np.float32),
             psfs=np.stack([gaussian_psf(7)] * 2), filters=np.array(["g", "r"]))
    _bad(tmp_path, capsys, [p], "image is empty")


def test_astropy_header_warnings_do_not_leak(tmp_path, capsys):
    """A file with bytes after its last HDU (a common truncated-copy artefact) and a
    header astropy fixes on reading: the data are read and stderr stays empty."""
    paths = []
    for name in "gr":
        path = _wcs_band(tmp_path, name)
        with fits.open(path) as h:
            h["IMAGE"].header["DATE-OBS"] = "2020-01-01"  # FITSFixedWarning: MJD-OBS set from it
            h["IMAGE"].header["RADECSYS"] = "ICRS"  # deprecated keyword, fixed by astropy
            h.writeto(path, overwrite=True)
        with open(path, "ab") as f:
            f.write(b"\0" * 80)
        paths.append(path)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest would otherwise swallow them
        assert run(["ingest", tmp_path / "ok.h5", *paths]) == 0
    assert [str(w.message) for w in caught] == []
    assert capsys.readouterr().err == ""

"""Visit input, the visit simulator, and the direct coadd (library and CLI)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("galsim")
from astropy.io import fits
from astropy.table import Table

from scarletstore.cli import main
from scarletstore.coadd.psf import warp_psf
from scarletstore.coadd.stack import COADD_MASK_PLANES, direct_coadd
from scarletstore.coadd.visits import read_grid, read_visit, read_visits
from scarletstore.coadd.warp import warp_image
from scarletstore.simulate.visits import simulate_visits
from scarletstore.store.store import Store


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("visits")
    return simulate_visits(out, n_visits=2, size=64, seed=3, bands="gr", density=20, n_stars=4)


@pytest.fixture(scope="module")
def clean_sim(tmp_path_factory):
    """Visits without background planes or artifacts, for noise and photometry checks."""
    out = tmp_path_factory.mktemp("clean")
    return simulate_visits(out, n_visits=4, size=128, seed=8, bands="r", density=15, n_stars=9,
                           background=False, artifacts=False)


def test_simulated_visits_follow_the_visit_format(sim):
    assert len(sim["visits"]) == 4
    visits = [read_visit(p) for p in sim["visits"]]
    assert [v.band for v in visits] == ["g", "g", "r", "r"]
    assert len({round(v.magzero, 6) for v in visits}) == 4  # zero points differ
    for v in visits:
        assert v.psf.shape[0] % 2 == 1 and v.psf.sum() == pytest.approx(1.0)
        assert v.shape == (81, 81) and v.wcs.has_celestial
    tv = Table.read(sim["visits"][0].parent / "truth_visits.fits")
    assert np.all((tv["fwhm"] >= 0.5) & (tv["fwhm"] <= 1.2))
    for b in "gr":  # one unflagged trail per band
        assert np.isfinite(np.asarray(tv["trail_theta"])[tv["band"] == b]).sum() == 1
    with fits.open(sim["visits"][0]) as h:
        cr = (h["MASK"].data & (1 << h["MASK"].header["MP_CR"])) != 0
        assert cr.sum() > 5
    tf = Table.read(sim["visits"][0].parent / "truth_visit_fluxes.fits")
    assert (np.asarray(tf["flux_transient"]) > 0).sum() == 1
    assert np.ptp(np.asarray(tf["flux_variable"])) > 0
    truth = Table.read(sim["truth"])
    assert {"variable", "transient"} <= set(truth["kind"])
    assert read_grid(sim["grid"]).shape == (64, 64)


def test_coadd_of_one_visit_equals_that_visit_warped(sim):
    grid = read_grid(sim["grid"])
    visit = read_visits([sim["visits"][2]], grid)[0]
    ex, table, _ = direct_coadd([visit], grid)
    img, var, msk = visit.load()
    warp = warp_image(img, var, msk, visit.bad_bits(), visit.wcs, grid.wcs, grid.shape,
                      flux_scale=visit.flux_scale(27.0))
    good = warp.good
    assert good.sum() > 0.5 * good.size
    np.testing.assert_allclose(ex["image"].values[0][good], warp.image[good], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ex["variance"].values[0][good], warp.variance[good], rtol=1e-5)
    nodata = (ex["mask"].values[0] & (1 << COADD_MASK_PLANES["NO_DATA"])) != 0
    assert np.array_equal(nodata, ~good)
    psf = warp_psf(visit.psf, visit.wcs, grid.wcs, grid.shape)
    np.testing.assert_allclose(ex["psf"].values[0], psf, atol=1e-6)
    assert ex.attrs["zeropoint"] == 27.0
    assert table["flux_scale"].values[0] == pytest.approx(10 ** (0.4 * (27 - visit.magzero)))
    # The full pipeline (what the CLI runs) has nothing to match or reject with one visit
    # (its final sky fit is tested in test_coadd_sky).
    from scarletstore.coadd.pipeline import coadd

    full = coadd([visit], grid, sky=False)["exposure"]
    np.testing.assert_array_equal(full["image"].values, ex["image"].values)
    np.testing.assert_array_equal(full["mask"].values, ex["mask"].values)


def _aperture(img, x, y, r):
    Y, X = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return float(img[(X - x) ** 2 + (Y - y) ** 2 <= r * r].sum())


def test_direct_coadd_noise_and_star_fluxes(clean_sim):
    grid = read_grid(clean_sim["grid"])
    ex, table, _ = direct_coadd(read_visits(clean_sim["visits"], grid), grid)
    img, var = ex["image"].values[0].astype(float), ex["variance"].values[0].astype(float)
    truth = Table.read(clean_sim["truth"])
    # Blank sky: further than 12 pixels from every source; truth is zero there.
    Y, X = np.mgrid[0:128, 0:128]
    far = np.isfinite(var)
    for x, y in zip(truth["x"], truth["y"]):
        far &= (X - x) ** 2 + (Y - y) ** 2 > 12**2
    z = img[far] / np.sqrt(var[far])
    assert far.sum() > 3000
    robust = 1.4826 * np.median(np.abs(z - np.median(z)))
    assert 0.95 < robust < 1.05
    # Bright stars: aperture flux over (truth x the coadd PSF's enclosed fraction).
    psf = ex["psf"].values[0].astype(float)
    c = psf.shape[0] // 2
    ef = _aperture(psf, c, c, 8)
    ratios = []
    for row in truth[truth["is_star"] & (truth["mag_i"] < 21.01) & (truth["kind"] == "static")]:
        f = _aperture(img, row["x"], row["y"], 8)
        ratios.append(f / (row["flux27_r"] * ef))
    assert len(ratios) >= 5
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    # Visit weights differ (the simulated depths do) and are recorded.
    w = table["weight"].values
    assert w.max() / w.min() > 1.2 and table["used"].values.all()


@pytest.mark.parametrize("defect", ["no_wcs", "no_magzero", "psf_sum", "psf_even", "shape",
                                    "no_overlap", "no_psf_hdu", "no_band"])
def test_bad_visit_is_refused_with_one_line_and_nothing_written(sim, tmp_path, capsys, defect):
    bad = tmp_path / "bad.fits"
    shutil.copy(sim["visits"][0], bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(bad, mode="update") as h:
            hdr = h["IMAGE"].header
            if defect == "no_wcs":
                for k in list(hdr):
                    if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "CDELT", "PC1_", "PC2_",
                                      "CUNIT")):
                        del hdr[k]
            elif defect == "no_magzero":
                del hdr["MAGZERO"]
            elif defect == "no_band":
                del hdr["BAND"]
            elif defect == "psf_sum":
                h["PSF"].data = h["PSF"].data * 0.9
            elif defect == "psf_even":
                h["PSF"].data = np.ones((10, 10)) / 100.0
            elif defect == "shape":
                h["VARIANCE"].data = h["VARIANCE"].data[:-1]
            elif defect == "no_overlap":
                hdr["CRVAL1"] = hdr["CRVAL1"] + 0.1  # 360 arcsec away: 1800 pixels
            elif defect == "no_psf_hdu":
                del h["PSF"]
    store = tmp_path / "coadd.h5"
    rc = main(["coadd", str(store), str(sim["visits"][1]), str(bad), "--grid", str(sim["grid"])])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "bad.fits" in err and "Traceback" not in err
    assert not store.exists()
    assert not list(tmp_path.glob(".*coadd*")) and not list(tmp_path.glob("*.tmp"))


def test_cli_bad_arguments_exit_2(sim, tmp_path, capsys):
    store = tmp_path / "c.h5"
    assert main(["coadd", str(store), str(sim["visits"][0]), "--grid", str(tmp_path / "nope.fits")]) == 2
    assert main(["coadd", str(store), str(sim["visits"][0]), "--grid", str(sim["grid"]),
                 "--bands", "z"]) == 2
    assert main(["coadd", str(store), str(sim["visits"][0]), "--grid", str(sim["grid"]),
                 "--workers", "0"]) == 2
    assert main(["coadd", str(store), str(sim["visits"][0]), str(sim["visits"][0]),
                 "--grid", str(sim["grid"])]) == 2
    assert not store.exists()
    assert main(["simulate", str(tmp_path / "s"), "--visits", "0"]) == 2
    assert main(["simulate", str(tmp_path / "s"), "--visits", "1", "--density", "-1"]) == 2
    assert main(["simulate", str(tmp_path / "s"), "--visits", "1", "--bands", "q"]) == 2


def test_cli_simulate_coadd_then_detect(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", str(out), "--visits", "2", "--size", "64", "--bands", "gr",
                 "--density", "30", "--seed", "4"]) == 0
    store = tmp_path / "coadd.h5"
    visits = sorted(str(p) for p in out.glob("visit_*.fits"))
    assert main(["coadd", str(store), *visits, "--grid", str(out / "grid.fits"), "--bands", "r,g",
                 "--workers", "2"]) == 0
    s = Store(store)
    ex = s.read("exposure")
    assert list(ex.band.values) == ["r", "g"]
    tab = s.read("visits")
    assert list(tab["band"].values) == ["r", "r", "g", "g"]
    assert tab["used"].values.dtype == bool and tab["used"].values.all()
    assert np.all((tab["psf_fwhm"].values > 0.45) & (tab["psf_fwhm"].values < 1.3))
    assert "CRVAL1" in tab["wcs"].values[0]
    planes = json.loads(ex.attrs["mask_planes"])
    assert planes["NO_DATA"] == 8 and "INEXACT_PSF" in planes
    # Cosmic rays are flagged on the coadd (information only) and left out of the stack.
    assert ((ex["mask"].values & (1 << planes["CR"])) != 0).sum() > 0
    # The Kaiser coadd is a schema'd group under coadds/, listed like any product.
    assert s.groups()["coadds/likelihood"]["schema"] == "likelihood_coadd"
    assert s.read("coadds/likelihood")["significance"].shape == (2, 64, 64)
    assert main(["detect", str(store)]) == 0
    assert s.read("parents").sizes["parent"] > 0


def test_psf_fwhm_of_gaussians():
    from scarletstore.coadd.stack import psf_fwhm

    y, x = np.mgrid[0:47, 0:47] - 23.0
    # A 2.8-pixel FWHM is barely sampled: its interpolated contour is ~1 % small.
    for sigma, tol in ((1.2, 0.02), (2.0, 0.006), (3.5, 0.006)):
        p = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
        assert psf_fwhm(p / p.sum(), 0.2) == pytest.approx(2.3548 * sigma * 0.2, rel=tol)

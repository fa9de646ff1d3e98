"""Aperture corrections: robust smooth fits, the stored product and its use in the catalog."""

import numpy as np
import pytest
from conftest import store_bytes
from scipy.signal import fftconvolve
from scipy.special import erf

from scarletstore.cli import main
from scarletstore.deblend.psf import difference_kernels, gaussian_psf
from scarletstore.ingest.exposure import make_exposure
from scarletstore.measure.apcorr import measure_apcorr
from scarletstore.measure.catalog import band_catalog
from scarletstore.measure.photometry.apcorr import (ApertureCorrection, chebyshev_terms,
                                                    design_matrix, fit_field)
from scarletstore.store.components import Component, SourceResult
from scarletstore.store.runs import BlendRecord, build_run
from scarletstore.store.schema import validate
from scarletstore.store.store import Store, copy_store

N = 240  # field side (pixels)
PSF0 = 1.6  # sigma of the stored band PSF; the stars' true PSF is broader and varies


def true_sigma(x, y):
    """The field's true PSF width: a smooth trend the stored PSF does not follow."""
    return PSF0 + 0.1 * (x / N) + 0.08 * (y / N) ** 2


def test_fit_field_recovers_a_trend_despite_outliers():
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, 500, 120), rng.uniform(0, 400, 120)
    u, v = 2 * (x + 0.5) / 500 - 1, 2 * (y + 0.5) / 400 - 1
    trend = 1.06 + 0.03 * u - 0.02 * v + 0.015 * u * v + 0.01 * (2 * v * v - 1)
    err = np.full(120, 0.003)
    ratio = trend + rng.normal(0, 0.003, 120)
    bad = rng.choice(120, 10, replace=False)
    ratio[bad] += rng.uniform(0.1, 0.4, 10)  # blends and galaxies that slipped through
    fit = fit_field(x, y, ratio, err, 2, 500, 400)
    assert fit["order"] == 2 and len(fit["terms"]) == 6
    assert not fit["used"][bad].any() and fit["used"].sum() >= 105
    gx, gy = np.meshgrid(np.linspace(0, 499, 11), np.linspace(0, 399, 11))
    a = design_matrix(gx.ravel(), gy.ravel(), fit["terms"], 500, 400)
    gu, gv = 2 * (gx.ravel() + 0.5) / 500 - 1, 2 * (gy.ravel() + 0.5) / 400 - 1
    expected = 1.06 + 0.03 * gu - 0.02 * gv + 0.015 * gu * gv + 0.01 * (2 * gv * gv - 1)
    np.testing.assert_allclose(a @ fit["coefficients"], expected, atol=0.002)
    assert fit["scatter"] == pytest.approx(0.003, rel=0.25)
    # the covariance describes the fit's error: predicted error at the centre ~ sigma / sqrt(n) scale
    centre = design_matrix([250.0], [200.0], fit["terms"], 500, 400)[0]
    assert 0.0002 < np.sqrt(centre @ fit["covariance"] @ centre) < 0.001
    # too few stars for order 2 lowers the order instead of over-fitting
    few = fit_field(x[:8], y[:8], ratio[:8] * 0 + 1.05, err[:8], 2, 500, 400)
    assert few["order"] == 0 and few["coefficients"][0] == pytest.approx(1.05)
    assert chebyshev_terms(1) == [(0, 0), (1, 0), (0, 1)]


def test_clipping_keeps_three_stars_a_term_and_records_the_order():
    from scarletstore.measure.photometry.apcorr import apcorr_dataset
    # 9 stars, a linear field (3 terms), heavy-tailed ratios: each round narrows the robust sigma,
    # and clipping went on down to 3 stars, an exact interpolation with a scatter of 3e-16
    rng = np.random.default_rng(8)
    x, y = rng.uniform(0, 200, 9), rng.uniform(0, 200, 9)
    ratio = 1.05 + rng.standard_cauchy(9) * 0.01
    fit = fit_field(x, y, ratio, np.full(9, 0.001), 1, 200, 200)
    assert fit["used"].sum() >= 3 * len(fit["terms"]) and fit["scatter"] > 1e-3
    # (here the two clipped stars leave 7, too few for a plane: a constant)
    assert fit["order"] == 0 and fit["used"].sum() == 7
    # 4 stars: the order falls to a constant, and clipping kept 2 of them, below the 3 a term
    rng = np.random.default_rng(6)
    x4, y4 = rng.uniform(0, 200, 4), rng.uniform(0, 200, 4)
    few = fit_field(x4, y4, 1.05 + rng.standard_cauchy(4) * 0.01, np.full(4, 0.001), 2, 200, 200)
    assert few["order"] == 0 and few["used"].sum() >= 3
    # the product records the order each flux type was fitted with (the asked one is in config)
    x, y = rng.uniform(0, 200, 30), rng.uniform(0, 200, 30)
    plane = fit_field(x, y, 1.05 + 0.01 * x / 200 + rng.normal(0, 0.001, 30), np.full(30, 0.001), 1,
                      200, 200)
    ds = apcorr_dataset({"psf_flux": few, "kron_flux": plane}, "r", "a", "aperture_flux_12", 200, 200,
                        {"order": 2}, reference_radius=12.0)
    validate(ds)
    assert ds["fit_order"].values.tolist() == [0, 1] and ds.attrs["order"] == 1


def test_an_outlier_is_clipped_even_when_the_order_must_fall_for_it():
    # 9 stars on a gentle linear trend and one galaxy among them (+0.3): clipping it leaves 8,
    # below 3 a term of a plane, and clipping used to stop and keep it: its plane was off by
    # 1.5-2.8 % at the centre and tilted by up to 11 % across the patch
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, y = rng.uniform(0, 200, 9), rng.uniform(0, 200, 9)
        ratio = 1.03 + 0.004 * (2 * (x + 0.5) / 200 - 1) + rng.normal(0, 0.001, 9)
        ratio[0] += 0.3
        fit = fit_field(x, y, ratio, np.full(9, 0.001), 1, 200, 200)
        assert not fit["used"][0] and fit["used"].sum() == 8 and fit["order"] == 0
        assert fit["coefficients"][0] == pytest.approx(1.03, abs=0.001)


def _blob(size, c, s):
    e = 0.5 * np.diff(erf((np.arange(size + 1) - 0.5 - c) / (np.sqrt(2) * s)))
    m = np.outer(e, e)
    return (m / m.max()).astype(np.float32)


def _build_field(path, placements, rng, sigma_of, spoil=None):
    """A one-band store of deblended sources: ``placements`` are (y0, x0, kind[, flux[, flags]]),
    the corner of each source's 25 px box (cut where it leaves the field); stars have the true
    PSF width ``sigma_of(x, y)``, galaxies are broad blobs. ``spoil(image, variance, mask)``
    edits the observed planes (defects). Returns (store, kinds, true fluxes)."""
    model_sigma, size = 0.8, 25
    psf = gaussian_psf(PSF0, 31)
    model_psf = gaussian_psf(model_sigma)
    (kernel,), _ = difference_kernels(psf[None], model_psf)
    truth_img = np.zeros((N, N))
    records, truth = [], []
    for i, (cy, cx, kind, *more) in enumerate(placements):
        sigma_true = sigma_of(cx + size // 2, cy + size // 2)
        # model-frame width whose observed image (through the stored kernel) has the true PSF
        s = np.sqrt(sigma_true ** 2 - PSF0 ** 2 + model_sigma ** 2) if kind == "star" else 3.0
        morph = _blob(size, size // 2 + rng.uniform(-0.3, 0.3), s)
        flux = rng.uniform(1500, 6000)
        flux = more[0] if more else flux
        spec = flux / morph.sum(dtype=np.float64)
        my, mx = max(-cy, 0), max(-cx, 0)  # rows and columns of the box off the field
        morph = np.ascontiguousarray(morph[my:, mx:])
        by, bx = max(cy - 3, 0), max(cx - 3, 0)
        bbox = (by, bx, min(cy + size + 3, N) - by, min(cx + size + 3, N) - bx)
        c = Component(np.array([spec], np.float32), morph, cy + my - by, cx + mx - bx,
                      (cy + size // 2 - by, cx + size // 2 - bx))
        records.append(BlendRecord(index=i, parent_id=i + 1, bbox=bbox, peak_ids=np.array([i]),
                                   peaks=np.array([[cy + size // 2, cx + size // 2]], float),
                                   sources=[SourceResult(0, [c], *more[1:])], iterations=1,
                                   log_likelihood=0.0, chi2=1.0, converged=True))
        scene = np.zeros((N, N))
        scene[cy + my:cy + size, cx + mx:cx + size] = morph * spec
        truth_img += fftconvolve(scene, kernel, mode="same")
        truth.append((kind, flux))
    image = (truth_img + rng.normal(0, 0.5, (N, N))).astype(np.float32)[None]
    variance, mask = np.full((1, N, N), 0.25, np.float32), np.zeros((1, N, N), np.int32)
    if spoil is not None:
        spoil(image[0], variance[0], mask[0])
    ex = make_exposure(image, variance, mask, [psf], ["r"], wcs="")
    run = build_run(records, ["r"], ex["psf"].values, model_psf, name="a", method="scarlet",
                    config_json="{}", package_version="test")
    Store.create(path, {"exposure": ex, "runs/a": run})
    kinds = np.array([k for k, _ in truth])
    return Store(path), kinds, np.array([f for _, f in truth])


GRID = [(y, x, "star") for y in range(15, N - 20, 30) for x in range(15, N - 20, 30)]


@pytest.fixture(scope="module")
def star_field(tmp_path_factory):
    """Isolated stars whose true PSF widens across the field, a few galaxies, noise; stored PSF fixed."""
    centres = GRID + [(30 + 45 * k, 28 + 41 * k, "galaxy") for k in range(5)]
    return _build_field(tmp_path_factory.mktemp("apc") / "a.h5", centres, np.random.default_rng(8), true_sigma)


def test_apcorr_recovers_an_injected_psf_trend(star_field, tmp_path):
    store, kinds, flux = star_field
    stars = kinds == "star"
    before = band_catalog(store, "r").compute()
    assert "psf_flux_uncorrected" not in before
    dev0 = before["psf_flux"].values[stars] / flux[stars] - 1
    # the stored PSF is too narrow, more so to the right and the top: PSF fluxes are low, with a trend
    assert np.median(dev0) < -0.03 and np.ptp(dev0) > 0.05

    ds = measure_apcorr(store, "r")
    validate(ds)
    assert ds.attrs["reference"] == "aperture_flux_12"
    k = list(ds["flux_type"].values).index("psf_flux")
    assert ds["n_candidates"].values[k] == stars.sum()  # galaxies fail the size cut
    store.write({"apcorr/r": ds})
    assert store.read("apcorr/r")["coefficients"].shape == ds["coefficients"].shape

    after = band_catalog(store, "r").compute()
    assert after.attrs["apcorr"] == "apcorr/r"
    np.testing.assert_array_equal(after["psf_flux_uncorrected"].values, before["psf_flux"].values)
    dev = after["psf_flux"].values[stars] / flux[stars] - 1
    assert abs(np.median(dev)) < 0.005 and np.max(np.abs(dev)) < 0.015
    # the fitted field is the true ratio total / PSF flux at every star
    corr = ApertureCorrection(store.read("apcorr/r"))
    c, ce = corr.evaluate("psf_flux", after["centroid_x"].values[stars], after["centroid_y"].values[stars])
    np.testing.assert_allclose(c, flux[stars] / before["psf_flux"].values[stars], rtol=0.015)
    # the correction's own uncertainty is added to the error, never removed
    assert np.all(after["psf_flux_err"].values[stars] > after["psf_flux_err_uncorrected"].values[stars])
    assert np.all(ce > 0)
    # every flux type is tied to the reference: small apertures become total fluxes too
    dev3 = after["aperture_flux_3"].values[stars] / flux[stars] - 1
    assert abs(np.median(dev3)) < 0.005
    out = tmp_path / "c.csv"
    assert main(["catalog", str(store.path), "--band", "r", "-o", str(out)]) == 0
    assert "psf_flux_uncorrected" in out.read_text().splitlines()[0]
    raw = band_catalog(store, "r", apcorr=False).compute()
    np.testing.assert_array_equal(raw["psf_flux"].values, before["psf_flux"].values)
    # a store holding the correction still migrates (apcorr/<band> sits in a container group)
    from scarletstore.store.migrate import migrate_store
    assert migrate_store(store) == {}
    assert main(["migrate", str(store.path)]) == 0


SAT_LEVEL = 1e4
SATURATED = (10, 24, 38)  # grid stars made too bright: the first two flagged masked_peak, the last not
SPOILED = {30: "BAD", 44: "zero variance"}  # grid stars with an unusable pixel 8 px out


def _centre(k):
    y0, x0, _ = GRID[k]
    return y0 + 12, x0 + 12


def _spoil(image, variance, mask):
    from scarletstore.ingest.exposure import LSST_MASK_PLANES
    near = np.zeros(image.shape, bool)
    for k in SATURATED:
        cy, cx = _centre(k)
        near[cy - 14:cy + 15, cx - 14:cx + 15] = True
    sat = near & (image > SAT_LEVEL)
    image[sat] = SAT_LEVEL
    mask[sat] |= 1 << LSST_MASK_PLANES["SAT"]
    (by, bx), (ny, nx) = _centre(30), _centre(44)
    mask[by, bx + 8] |= 1 << LSST_MASK_PLANES["BAD"]
    variance[ny + 8, nx] = 0.0  # (ingest refuses non-finite variance on unmasked pixels)


@pytest.fixture(scope="module")
def defect_field(tmp_path_factory):
    """A constant PSF (the stored one): the true correction is flat. Among the grid stars,
    saturated and spoiled ones, and a bright star 3 px from the left edge whose 12 px
    reference aperture the edge cuts."""
    centres = list(GRID)
    for n, k in enumerate(SATURATED):
        centres[k] = (*GRID[k][:2], "star", 5e5, 32 if n < 2 else 0)
    centres.append((120, -9, "star", 1e5))
    return _build_field(tmp_path_factory.mktemp("apd") / "d.h5", centres, np.random.default_rng(3),
                        lambda x, y: PSF0, _spoil)


def test_apcorr_uses_only_stars_whose_reference_aperture_is_clean(defect_field, tmp_path, capsys):
    store, kinds, flux = defect_field
    edge = len(kinds) - 1
    clean = np.ones(len(kinds), bool)
    clean[[*SATURATED, *SPOILED, edge]] = False
    raw = band_catalog(store, "r", apcorr=False).compute()
    assert raw["centroid_x"].values[edge] < 3.5  # the reference aperture reaches 8 px off the field
    ds = measure_apcorr(store, "r")
    validate(ds)
    k = list(ds["flux_type"].values).index("psf_flux")
    # flagged saturated stars fail the flags; the rest fail the aperture rule
    assert ds["n_candidates"].values[k] == clean.sum()
    assert ds.attrs["n_rejected"] == 4 and ds.attrs["reference_radius"] == 12.0
    # the summary says how many were set aside
    assert main(["apcorr", str(_copy(store, tmp_path)), "--band", "r"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        "; 4 stars set aside (reference aperture off the image or on masked pixels)")
    corr = ApertureCorrection(ds)
    c, _ = corr.evaluate("psf_flux", raw["centroid_x"].values[clean], raw["centroid_y"].values[clean])
    dev = raw["psf_flux"].values[clean] * c / flux[clean] - 1
    # (the edge star, pinning the fit, and clipping had left clean stars 1 % off)
    assert abs(np.median(dev)) < 0.001 and np.max(np.abs(dev)) < 0.003


def _copy(store, tmp_path):
    path = tmp_path / "copy.h5"
    copy_store(store.path, path)
    return path


def test_apcorr_cli_fits_stores_and_summarises(star_field, tmp_path, capsys):
    import re
    store, kinds, flux = star_field
    path = _copy(store, tmp_path)
    stars = kinds == "star"
    raw = band_catalog(Store(path), "r", apcorr=False).compute()
    true_ratio = flux[stars] / raw["psf_flux"].values[stars]
    capsys.readouterr()
    assert main(["apcorr", str(path), "--band", "r"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.search(r"apcorr/r \(run a\): psf_flux (\d+) of (\d+) stars \(order 2\) x([\d.]+)-([\d.]+) "
                  r"\+- ([\d.]+); (\d+) flux types to aperture_flux_12 \(12 px\), each from [\d-]+ of 49 stars, "
                  r"order 2 of 2 asked$", line)
    assert m, line
    used, candidates = int(m[1]), int(m[2])
    assert candidates == stars.sum() and used >= candidates - 3
    lo, hi, err = float(m[3]), float(m[4]), float(m[5])
    # the range over the patch brackets the true correction at the stars (the field extrapolates a little)
    assert lo < true_ratio.min() + 0.005 and hi > true_ratio.max() - 0.005
    assert hi - lo > 0.04 and 0 < err < 0.01
    assert int(m[6]) == 5  # psf, the two smaller apertures, kron, gaap (all but the reference)
    corr = ApertureCorrection(Store(path).read("apcorr/r"))
    c, _ = corr.evaluate("psf_flux", raw["centroid_x"].values[stars], raw["centroid_y"].values[stars])
    np.testing.assert_allclose(c, true_ratio, rtol=0.015)
    # re-fitting replaces the stored correction with the same fit (it is fitted on uncorrected fluxes)
    assert main(["apcorr", str(path), "--band", "r"]) == 0
    assert capsys.readouterr().out.strip().startswith("replaced apcorr/r")
    np.testing.assert_allclose(Store(path).read("apcorr/r")["coefficients"].values,
                               corr.coef, rtol=1e-12)
    # a later write (here a second run) keeps the nested product, in either layout
    Store(path).add_run(Store(path).read("runs/a"), name="b")
    assert Store(path).has("apcorr/r") and Store(path).runs() == ["a", "b"]
    np.testing.assert_allclose(Store(path).read("apcorr/r")["coefficients"].values, corr.coef, rtol=1e-12)


def test_catalog_names_the_correction_and_warns_when_it_was_fitted_on_another_run(star_field, tmp_path,
                                                                                     capsys):
    from astropy.io import fits
    store, _, _ = star_field
    path = _copy(store, tmp_path)
    assert main(["apcorr", str(path), "--band", "r", "--run", "a"]) == 0
    stored = Store(path).read("apcorr/r")
    assert stored.attrs["run"] == "a" and stored.attrs["reference_radius"] == 12.0
    out = tmp_path / "a.fits"
    capsys.readouterr()
    assert main(["catalog", str(path), "--band", "r", "--run", "a", "-o", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    head = fits.getheader(out, 1)
    assert (head["APCORR"], head["APC_RUN"], head["APC_REF"], head["APC_RAD"], head["APC_NOTE"]) == \
        ("apcorr/r", "a", "aperture_flux_12", 12.0, "")
    # another run of the same data: the correction still applies (it belongs to the PSF and the
    # measurement), and the catalog and stderr say it came from run a
    Store(path).add_run(Store(path).read("runs/a"), name="b")
    with pytest.warns(UserWarning, match="fitted on run a, applied to run b"):
        cat = band_catalog(Store(path), "r", run="b")
    assert cat.attrs["apc_run"] == "a" and "psf_flux_uncorrected" in cat
    out = tmp_path / "b.fits"
    assert main(["catalog", str(path), "--band", "r", "--run", "b", "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err.count("scarletstore catalog: warning: aperture correction apcorr/r was fitted on run a, "
                     "applied to run b") == 1
    assert fits.getheader(out, 1)["APC_NOTE"] == "fitted on run a, not this run"


def test_catalog_with_apertures_the_correction_has_no_term_for_says_which_are_left_uncorrected(
        star_field, tmp_path, capsys):
    from astropy.io import fits
    store, _, _ = star_field
    path = _copy(store, tmp_path)
    assert main(["apcorr", str(path), "--band", "r"]) == 0  # fitted with 3, 6 and 12 px
    plain = band_catalog(Store(path), "r")
    assert plain.attrs["apc_skip"] == ""
    out = tmp_path / "c.fits"
    capsys.readouterr()
    assert main(["catalog", str(path), "--band", "r", "--apertures", "4,6,12", "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err.count("scarletstore catalog: warning: aperture correction apcorr/r has no term for "
                     "aperture_flux_4 (fitted for psf_flux, aperture_flux_3, aperture_flux_6, "
                     "kron_flux, gaap_flux): left uncorrected") == 1, err
    assert fits.getheader(out, 1)["APC_SKIP"] == "aperture_flux_4"
    with pytest.warns(UserWarning, match="no term for aperture_flux_4"):
        cat = band_catalog(Store(path), "r", apertures=[4, 6, 12])
    # the covered columns are corrected as in the plain catalog; the other one is raw
    assert "aperture_flux_4_uncorrected" not in cat and "aperture_flux_6_uncorrected" in cat
    np.testing.assert_allclose(cat["aperture_flux_6"].values, plain["aperture_flux_6"].values, rtol=1e-12)
    np.testing.assert_allclose(cat["psf_flux"].values, plain["psf_flux"].values, rtol=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--band", "z"], "band 'z' is not in run a"),
    (["--band", "r", "--min-snr", "1e9"], "needs at least 3 bright isolated stars, found 0"),
    (["--band", "r", "--min-snr", "-1"], "--min-snr must be a positive number"),
    (["--band", "r", "--min-snr", "nan"], "--min-snr must be a positive number, got nan"),
    (["--band", "r", "--min-snr", "inf"], "--min-snr must be a positive number, got inf"),
    # a reference smaller than the PSF (FWHM 3.8 px here) misses a PSF-dependent part of the light
    (["--band", "r", "--apertures", "2,3"], "reference aperture radius 3 px is below 2 PSF FWHM of band r"),
    (["--band", "r", "--run", "nope"], "no run 'nope'"),
    (["--band", "r", "--apertures", "3,x"], "--apertures: expected comma-separated radii"),
])
def test_apcorr_cli_bad_input_is_one_line_and_writes_nothing(star_field, tmp_path, capsys, argv, message):
    store, _, _ = star_field
    path = _copy(store, tmp_path)
    before = store_bytes(path)
    capsys.readouterr()
    assert main(["apcorr", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert store_bytes(path) == before


def test_catalog_cli_parents_writes_one_row_per_parent(star_field, tmp_path, capsys):
    import pandas as pd
    store, kinds, flux = star_field
    path = _copy(store, tmp_path)
    assert main(["apcorr", str(path), "--band", "r"]) == 0
    out = tmp_path / "parents.csv"
    assert main(["catalog", str(path), "--band", "r", "--parents", "-o", str(out)]) == 0
    assert f"wrote {len(kinds)} parent rows of band r" in capsys.readouterr().out
    parents = pd.read_csv(out)
    children = band_catalog(Store(path), "r").compute()
    assert len(parents) == len(kinds) and (parents["n_children"] == 1).all()
    assert np.array_equal(parents["parent"].values, children["parent"].values)
    # one child per parent: the parent measured whole is that child, aperture-corrected like it
    for c in ("psf_flux", "aperture_flux_6", "kron_flux", "gaap_flux", "psf_flux_uncorrected"):
        np.testing.assert_allclose(parents[c].values, children[c].values, rtol=1e-5)
    stars = kinds == "star"
    assert abs(np.median(parents["psf_flux"].values[stars] / flux[stars] - 1)) < 0.005
    assert main(["catalog", str(path), "--band", "q", "--parents", "-o", str(tmp_path / "q.csv")]) == 2
    assert not (tmp_path / "q.csv").exists()

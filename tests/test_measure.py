"""Measurement families against analytic profiles and noise draws."""

import numpy as np
import pytest
from scipy.special import erf

from scarletstore.measure.photometry import (PHOT_FLAGS, PhotometryConfig, flux_columns,
                                             measure_suite)
from scarletstore.measure.photometry.aperture import circular_flux
from scarletstore.measure.photometry.blend import child_shares
from scarletstore.measure.photometry.moments import OK, adaptive_moments, psf_covariance
from scarletstore.measure.photometry.psf_flux import psf_flux

H = W = 71


def pixel_gaussian(cx, cy, sigma, flux=1.0, shape=(H, W)):
    """Round Gaussian integrated over each pixel (exact, via erf)."""
    def edges(c, n):
        e = (np.arange(n + 1) - 0.5 - c) / (np.sqrt(2) * sigma)
        return 0.5 * np.diff(erf(e))
    return flux * np.outer(edges(cy, shape[0]), edges(cx, shape[1]))


def sampled_gaussian(cx, cy, cov, flux=1.0, shape=(H, W)):
    """Elliptical Gaussian of covariance ``cov`` (xx, yy, xy) sampled at pixel centres."""
    y, x = np.indices(shape, dtype=float)
    m = np.array([[cov[0], cov[2]], [cov[2], cov[1]]])
    mi = np.linalg.inv(m)
    dx, dy = x - cx, y - cy
    q = mi[0, 0] * dx * dx + 2 * mi[0, 1] * dx * dy + mi[1, 1] * dy * dy
    return flux * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(m)))


def moffat(cx, cy, fwhm, beta, shape, sub=5):
    """Moffat profile integrated over pixels by sub-sampling, unit sum."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    off = (np.arange(sub) + 0.5) / sub - 0.5
    y, x = np.indices(shape, dtype=float)
    img = np.zeros(shape)
    for oy in off:
        for ox in off:
            r2 = (x + ox - cx) ** 2 + (y + oy - cy) ** 2
            img += (1 + r2 / alpha ** 2) ** (-beta)
    return img / img.sum()


def centred_psf(profile, size, **kw):
    c = size // 2
    return profile(c, c, shape=(size, size), **kw)


def suite(values, cov_model, centre, psf, var=None, config=PhotometryConfig()):
    """The suite on one isolated object (its own model as geometry)."""
    values = np.asarray(values, float)[None]
    var_eff = None if var is None else np.broadcast_to(var, values.shape)
    weight = np.ones(values.shape[1:]) if var is None else 1.0 / np.broadcast_to(var, values.shape[1:])
    cols, flags = measure_suite(values, values, var_eff, weight, np.array([centre]), np.array([cov_model]),
                                psf, psf_covariance(psf), config)
    return {k: v[0] for k, v in cols.items()}, int(flags[0])


@pytest.mark.parametrize("kind", ["gaussian", "moffat"])
def test_psf_flux_of_noiseless_star(kind):
    """A star at a sub-pixel position: the PSF fit returns its flux to 0.1 %."""
    cx, cy, flux = 35.37, 34.79, 2500.0
    if kind == "gaussian":
        psf = centred_psf(pixel_gaussian, 41, sigma=1.8)
        star = pixel_gaussian(cx, cy, 1.8, flux)
    else:  # a profile with wings, unlike the Gaussian PSFs the code was written against
        psf = centred_psf(moffat, 41, fwhm=4.5, beta=4.5)
        star = flux * moffat(cx, cy, 4.5, 4.5, (H, W))
    f, e = psf_flux(star, np.ones((H, W)), np.ones((H, W)), psf, cx, cy)
    assert f == pytest.approx(flux, rel=1e-3)
    # the unshifted PSF would be wrong by far more: the shift matters
    f0, _ = psf_flux(star, np.ones((H, W)), np.ones((H, W)), psf, round(cx), round(cy))
    assert abs(f0 / flux - 1) > 5e-3
    assert e == pytest.approx(1 / np.sqrt((psf ** 2).sum()), rel=1e-3)


@pytest.mark.parametrize("sigma, cx, cy", [(1.5, 35.2, 35.7), (2.0, 35.0, 35.0), (2.7, 35.41, 34.83),
                                           (4.1, 36.2, 35.55)])
def test_aperture_fluxes_match_the_gaussian_profile(sigma, cx, cy):
    """Circular apertures enclose 1 - exp(-R^2 / 2 sigma^2) of a pixel-integrated Gaussian (0.3 %).

    With boundary pixels taken as uniform the R = 3 flux of sigma = 2 was 2.6 % low.
    """
    img = pixel_gaussian(cx, cy, sigma, 1000.0)
    for r in (3.0, 4.5, 6.0, 12.0):
        f, _, area = circular_flux(img, np.ones((H, W)), cx, cy, r)
        expected = 1000.0 * (1 - np.exp(-r * r / (2 * sigma * sigma)))
        assert f == pytest.approx(expected, rel=3e-3), r
        assert area == pytest.approx(np.pi * r * r, rel=1e-3)


def test_gaap_colours_agree_across_seeing():
    """GAaP colours of a star and of a galaxy are the same in two bands of different PSF."""
    sig = {"g": 1.3, "i": 2.2}  # Gaussian PSFs (pixels)
    psfs = {b: centred_psf(sampled_gaussian, 51, cov=(s * s, s * s, 0.0)) for b, s in sig.items()}
    flux = {"g": 800.0, "i": 1900.0}
    galaxy = (3.0, 1.8, 0.6)  # intrinsic covariance, elliptical
    config = PhotometryConfig(gaap_sigma=3.2)
    gaap, aper = {}, {}
    for b, s in sig.items():
        for name, intrinsic in (("star", (0.0, 0.0, 0.0)), ("galaxy", galaxy)):
            cov = (intrinsic[0] + s * s, intrinsic[1] + s * s, intrinsic[2])
            img = sampled_gaussian(35.3, 35.6, cov, flux[b])
            cols, flags = suite(img, cov, (35.3, 35.6), psfs[b], config=config)
            assert flags == 0
            gaap[name, b], aper[name, b] = cols["gaap_flux"], cols["aperture_flux_3"]
    true_colour = flux["g"] / flux["i"]
    for name in ("star", "galaxy"):
        assert gaap[name, "g"] / gaap[name, "i"] == pytest.approx(true_colour, rel=0.01)
        # a fixed post-seeing aperture does not give the colour: seeing differs
        assert abs(aper[name, "g"] / aper[name, "i"] / true_colour - 1) > 0.05
    assert gaap["star", "i"] == pytest.approx(flux["i"], rel=0.01)  # point source: total flux
    # the galaxy's GAaP flux is its pre-seeing flux through the aperture
    a = config.gaap_sigma ** 2
    expected = flux["g"] * np.sqrt(a * a / ((galaxy[0] + a) * (galaxy[1] + a) - galaxy[2] ** 2))
    assert gaap["galaxy", "g"] == pytest.approx(expected, rel=0.01)


def test_gaap_flags_a_psf_broader_than_the_aperture():
    psf = centred_psf(sampled_gaussian, 41, cov=(6.0, 6.0, 0.0))
    img = sampled_gaussian(35, 35, (6.0, 6.0, 0.0), 100.0)
    cols, flags = suite(img, (6.0, 6.0, 0.0), (35.0, 35.0), psf, config=PhotometryConfig(gaap_sigma=2.4))
    assert flags & PHOT_FLAGS["gaap_psf_too_broad"]
    assert np.isnan(cols["gaap_flux"])
    assert flags & ~PHOT_FLAGS["gaap_psf_too_broad"] == 0  # the other families still measured
    assert np.isfinite(cols["psf_flux"])


@pytest.mark.parametrize("cov", [(9.0, 4.0, 2.0), (2.5, 6.0, -1.2), (16.0, 16.0, 0.0)])
def test_adaptive_moments_recover_an_elliptical_gaussian(cov):
    img = sampled_gaussian(34.6, 35.3, cov, 500.0)
    xx, yy, xy, cx, cy, status = adaptive_moments(img, 35.0, 35.0, 2.0, 100, 1e-8)
    assert status == OK
    assert (cx, cy) == pytest.approx((34.6, 35.3), abs=1e-4)
    np.testing.assert_allclose([xx, yy, xy], cov, rtol=1e-3, atol=1e-3)
    e1 = (xx - yy) / (xx + yy)
    e2 = 2 * xy / (xx + yy)
    assert e1 == pytest.approx((cov[0] - cov[1]) / (cov[0] + cov[1]), abs=1e-4)
    assert e2 == pytest.approx(2 * cov[2] / (cov[0] + cov[1]), abs=1e-4)


def test_adaptive_moments_failure_is_flagged():
    psf = centred_psf(pixel_gaussian, 31, sigma=1.5)
    img = -sampled_gaussian(35, 35, (4.0, 4.0, 0.0), 100.0)  # no positive light
    cols, flags = suite(img, (4.0, 4.0, 0.0), (35.0, 35.0), psf)
    assert flags & PHOT_FLAGS["shape_failed"]
    assert np.isnan(cols["shape_xx"])
    cols, flags = suite(-img, (4.0, 4.0, 0.0), (35.0, 35.0), psf)
    assert flags == 0 and cols["shape_xx"] == pytest.approx(4.0, rel=1e-3)


def _noise_draws(truth, var, shares, psf, cov_models, centres, n=400, seed=11):
    """Every flux column of each child over ``n`` noise draws, and the reported errors."""
    rng = np.random.default_rng(seed)
    image = truth.sum(axis=0)
    var_eff = shares * shares * var[None]
    names = flux_columns(PhotometryConfig())
    got = {k: [] for k in names}
    err = None
    for _ in range(n):
        noisy = image + rng.normal(0, np.sqrt(var))
        cols, flags = measure_suite(shares * noisy[None], truth, var_eff, 1 / var, centres, cov_models,
                                    psf, psf_covariance(psf), PhotometryConfig())
        assert np.all(flags == 0)
        for k in names:
            got[k].append(cols[k])
        err = err or {k: cols[k + "_err"] for k in names}
    return {k: np.array(v) for k, v in got.items()}, err


def test_errors_match_the_scatter_over_noise_draws():
    """Reported errors of every flux type equal the scatter over draws (10 %), isolated and blended."""
    psf = centred_psf(moffat, 31, fwhm=4.0, beta=3.5)
    y, x = np.indices((H, W))
    var = 4.0 + 3.0 * (x / W) + 2.0 * (y / H) ** 2  # non-uniform, as a coadd's variance plane is
    covs = np.array([(5.0, 3.5, 0.8), (4.0, 4.0, 0.0)])
    centres = np.array([(30.2, 34.7), (37.6, 36.1)])  # 7.5 px apart: blended
    truth = np.array([sampled_gaussian(*centres[k], covs[k], f) for k, f in enumerate((3000.0, 1500.0))])
    for blended in (False, True):
        t = truth if blended else truth[:1]
        shares = child_shares(t, np.ones((H, W), bool))
        fluxes, errs = _noise_draws(t, var, shares, psf, covs[:len(t)], centres[:len(t)])
        for k, f in fluxes.items():
            ratio = f.std(axis=0, ddof=1) / errs[k]
            np.testing.assert_allclose(ratio, 1.0, atol=0.1, err_msg=f"{k} blended={blended}")


@pytest.mark.parametrize("window", [(0, 41, 0, 41), (5, 30, 10, 20), (10, 15, 0, 41), (0, 41, 3, 9)])
def test_psf_shift_matches_the_fourier_shift(window):
    """The compiled Dirichlet shift equals the FFT phase ramp on the rows/columns asked for."""
    from scarletstore.measure.photometry.psf_flux import _shift_odd

    psf = centred_psf(moffat, 41, fwhm=4.0, beta=3.0)
    dy, dx = 0.31, -0.44
    ramp = np.exp(-2j * np.pi * (np.fft.fftfreq(41)[:, None] * dy + np.fft.rfftfreq(41)[None, :] * dx))
    ref = np.fft.irfft2(np.fft.rfft2(psf) * ramp, s=psf.shape)
    ya, yb, xa, xb = window
    got = _shift_odd(psf, dy, dx, ya, yb, xa, xb)
    np.testing.assert_allclose(got[ya:yb, xa:xb], ref[ya:yb, xa:xb], atol=1e-6 * psf.max())
    outside = np.ones(psf.shape, bool)
    outside[ya:yb, xa:xb] = False
    assert np.all(got[outside] == 0)

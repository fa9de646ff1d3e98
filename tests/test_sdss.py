"""Tests of the SDSS-style symmetric-template deblender (scarletstore.deblend.sdss)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scarletstore.deblend import DeblendConfig
from scarletstore.deblend.sdss import deblend_sdss, fit_point_source, symmetric_template
from scarletstore.errors import InputError
from scarletstore.store.components import SOURCE_EDGE, SOURCE_NO_FLUX, SOURCE_POINT

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def gaussian(shape, cy, cx, sig_major, sig_minor=None, theta=0.0, flux=1.0):
    """Pixel-centre-sampled elliptical Gaussian, symmetric about (cy, cx)."""
    sig_minor = sig_major if sig_minor is None else sig_minor
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    dy, dx = y - cy, x - cx
    u = dy * np.cos(theta) + dx * np.sin(theta)
    v = -dy * np.sin(theta) + dx * np.cos(theta)
    g = np.exp(-0.5 * ((u / sig_major) ** 2 + (v / sig_minor) ** 2))
    return flux * g / (2 * np.pi * sig_major * sig_minor)


def gaussian_psfs(bands, sigma=1.5, size=25):
    psf = gaussian((size, size), size // 2, size // 2, sigma)
    psf /= psf.sum()
    return np.repeat(psf[None], bands, axis=0)


def cube_model(result, shape):
    """Sum of the children's cubes on the blend box (band, y, x)."""
    model = np.zeros(shape)
    for src in result.sources:
        for comp in src.components:
            _, h, w = comp.morph.shape
            model[:, comp.y0:comp.y0 + h, comp.x0:comp.x0 + w] += comp.morph
    return model


def child_flux(result):
    return np.array([src.components[0].spectrum for src in result.sources])


# ---------------------------------------------------------------------------
# symmetric template
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("center", [(20.0, 22.0), (20.5, 21.5), (19.5, 22.0)])
def test_symmetric_template_of_symmetric_source_is_the_source(center):
    # an elliptical, rotated Gaussian is symmetric under 180-degree rotation
    # about its centre (integer or half-integer) and monotonic along rays
    img = gaussian((41, 45), *center, 3.0, 1.5, theta=0.5, flux=5000.0)
    np.testing.assert_allclose(symmetric_template(img, center), img, rtol=0, atol=1e-9)
    np.testing.assert_allclose(symmetric_template(img, center, monotonic=True), img,
                               rtol=0, atol=1e-9)


def test_symmetric_template_removes_neighbour_and_interpolates_bad_pixel():
    src = gaussian((41, 41), 20, 20, 3.0, flux=5000.0)
    neighbour = gaussian((41, 41), 20, 30, 2.0, flux=3000.0)
    bad = np.zeros((41, 41), bool)
    bad[18, 17] = True  # its mirror (22, 23) is good
    img = src + neighbour
    img[bad] = 1e6  # garbage that must not leak into the template
    t = symmetric_template(img, (20, 20), bad=bad)
    # the neighbour's light is removed where its mirror is free of it
    assert t[20, 30] == pytest.approx(src[20, 30] + neighbour[20, 10], rel=1e-12)
    assert t[18, 17] == pytest.approx(img[22, 23])
    assert t.sum() == pytest.approx(src.sum(), rel=2e-3)


def test_symmetric_template_outside_footprint_mirror_is_zero():
    img = gaussian((31, 31), 10, 10, 2.0, flux=1000.0)
    fp = np.ones((31, 31), bool)
    fp[:, 15:] = False
    t = symmetric_template(img, (10, 10), footprint=fp)
    # off the footprint, or mirrored off it (x' = 20 - x >= 15, i.e. x <= 5),
    # or mirrored off the box (y' = 20 - y < 0): 0
    assert np.all(t[:, 15:] == 0)
    assert np.all(t[:, :6] == 0)
    assert np.all(t[21:] == 0)
    # where pixel and mirror are both on the footprint: the source itself
    np.testing.assert_allclose(t[:21, 6:15], img[:21, 6:15])


# ---------------------------------------------------------------------------
# full deblender on synthetic blends
# ---------------------------------------------------------------------------


def two_galaxies(noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    B, H, W = 3, 40, 60
    sed1 = np.array([1.0, 2.0, 3.0])
    sed2 = np.array([3.0, 2.0, 1.0])
    g1 = gaussian((H, W), 20, 15, 3.0, 2.0, theta=0.3, flux=1000.0)
    g2 = gaussian((H, W), 19, 44, 2.5, flux=1000.0)
    truth = np.stack([sed1[:, None, None] * g1, sed2[:, None, None] * g2])
    img = truth.sum(0) + rng.normal(0, noise, (B, H, W))
    var = np.full((B, H, W), noise ** 2)
    peaks = np.array([[20.0, 15.0], [19.0, 44.0]])
    return img.astype(np.float32), var.astype(np.float32), truth, peaks


def test_two_separated_sources_are_split_to_one_percent():
    img, var, truth, peaks = two_galaxies()
    res = deblend_sdss(img, var, None, None, gaussian_psfs(3), peaks, DeblendConfig())
    assert len(res.sources) == 2
    # a direct solution: no iterations, final as it stands
    assert res.frame == "observed" and res.iterations == 0 and res.converged
    true_flux = truth.sum(axis=(2, 3))
    np.testing.assert_allclose(child_flux(res), true_flux, rtol=0.01)
    for src in res.sources:
        assert not src.flags & (SOURCE_POINT | SOURCE_NO_FLUX)
        comp = src.components[0]
        assert comp.is_cube and comp.morph.shape[0] == 3
        np.testing.assert_allclose(comp.morph.sum(axis=(1, 2)), comp.spectrum, rtol=1e-5)
    # each child stays on its own side
    c0, c1 = res.sources[0].components[0], res.sources[1].components[0]
    assert c0.x0 + c0.morph.shape[2] <= 45 and c1.x0 >= 14


@pytest.mark.parametrize("stray", ["none", "nearest"])
def test_children_sum_to_image(stray):
    img, var, truth, peaks = two_galaxies(noise=1.0, seed=3)
    B, H, W = img.shape
    fp = np.zeros((H, W), bool)
    fp[3:37, 2:58] = True
    bad = np.zeros((B, H, W), bool)
    bad[1, 10, 10] = True
    res = deblend_sdss(img, var, bad, fp, gaussian_psfs(B), peaks, stray_flux=stray)
    model = cube_model(res, img.shape)
    # nothing is ever given outside the footprint
    assert np.all(model[:, ~fp] == 0)
    covered = np.zeros((B, H, W), bool)
    for src in res.sources:
        c = src.components[0]
        _, h, w = c.morph.shape
        covered[:, c.y0:c.y0 + h, c.x0:c.x0 + w] |= c.morph != 0
    good = fp[None] & ~bad
    if stray == "nearest":
        # every good footprint pixel is handed out completely
        np.testing.assert_allclose(model[good], img[good], rtol=1e-5, atol=1e-4)
        assert res.extra["n_unassigned"] == 0
        assert abs(res.extra["apportioned_log_likelihood"]) < 1e-6
    else:
        # exactly the image where some template is non-zero, nothing elsewhere
        cov = good & covered
        np.testing.assert_allclose(model[cov], img[cov], rtol=1e-5, atol=1e-4)
        assert np.all(model[good & ~covered] == 0)
        assert res.extra["n_unassigned"] == int((good & ~covered).sum())
        resid = ((img - model) ** 2 / var)[good].sum()
        assert res.extra["apportioned_log_likelihood"] == pytest.approx(-0.5 * resid, rel=1e-4)
        assert res.extra["apportioned_chi2"] == pytest.approx(resid / good.sum(), rel=1e-4)
    # the recorded figures are the template model's, a real fit: two symmetric
    # galaxies are modelled to the noise level (chi2 ~ 1, logL ~ -n/2), not 0
    assert res.log_likelihood == res.extra["template_log_likelihood"]
    assert res.chi2 == pytest.approx(-2 * res.log_likelihood / good.sum(), rel=1e-12)
    assert 0.8 < res.chi2 < 1.5
    assert res.extra["template_chi2"] < 3.0
    assert res.extra["template_amplitudes"].shape == (B, 2)
    assert res.extra["flux_err"].shape == (2, B)
    assert np.all(res.extra["flux_err"] > 0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 4))
def test_flux_conservation_random_blends(seed, n):
    rng = np.random.default_rng(seed)
    B, H, W = 2, 24, 26
    peaks = np.column_stack([rng.uniform(2, H - 3, n), rng.uniform(2, W - 3, n)]).round()
    img = rng.normal(0, 1.0, (B, H, W))
    for p in peaks:
        img += rng.uniform(50, 500) * gaussian((H, W), *p, rng.uniform(1.0, 3.0))[None]
    var = np.ones((B, H, W))
    res = deblend_sdss(img, var, None, None, gaussian_psfs(B, size=11), peaks)
    model = cube_model(res, img.shape)
    np.testing.assert_allclose(model, img, rtol=1e-5, atol=1e-5)
    assert len(res.sources) == n


def test_star_is_point_source_and_galaxy_is_not():
    rng = np.random.default_rng(7)
    B, H, W = 4, 44, 50
    psfs = gaussian_psfs(B, sigma=1.5)
    star = gaussian((H, W), 14.3, 12.6, 1.5, flux=1.0)  # sub-pixel position
    gal = gaussian((H, W), 26, 34, 4.0, 2.5, theta=0.8, flux=1.0)
    star_sed = np.array([800.0, 1500.0, 2000.0, 2200.0])
    gal_sed = np.array([3000.0, 4000.0, 5000.0, 6000.0])
    img = star_sed[:, None, None] * star + gal_sed[:, None, None] * gal
    img += rng.normal(0, 1.0, img.shape)
    var = np.ones(img.shape)
    peaks = np.array([[14.0, 13.0], [26.0, 34.0]])  # detection peaks: pixel centres
    res = deblend_sdss(img, var, None, None, psfs, peaks)
    assert res.sources[0].flags & SOURCE_POINT
    assert not res.sources[1].flags & SOURCE_POINT
    assert res.extra["is_point"].tolist() == [True, False]
    # the point-source fit found the sub-pixel centre and the flux
    np.testing.assert_allclose(res.extra["point_center"][0], [14.3, 12.6], atol=0.1)
    # whole box as footprint: each child also holds the sky pixels nearest to
    # it, so the tolerance is the noise of its pixels (flux_err)
    tol = 4 * res.extra["flux_err"] + 0.01 * np.stack([star_sed, gal_sed])
    assert np.all(np.abs(child_flux(res) - np.stack([star_sed, gal_sed])) < tol)
    red, center, amps = fit_point_source(img, var, psfs, (14, 13))
    assert red < 1.5
    np.testing.assert_allclose(amps, star_sed, rtol=0.02)
    red_gal, _, _ = fit_point_source(img, var, psfs, (26, 34))
    assert red_gal > 5


def test_no_flux_edge_and_forced_point_sources():
    B, H, W = 2, 30, 30
    src = 200 * gaussian((H, W), 10, 10, 2.0)
    src[src < 1e-3] = 0.0  # exactly empty sky around (25, 25)
    img = np.repeat(src[None], B, axis=0)
    var = np.ones((B, H, W))
    peaks = np.array([[10.0, 10.0], [25.0, 25.0], [0.0, 12.0]])
    res = deblend_sdss(img, var, None, None, gaussian_psfs(B, size=11), peaks,
                       point_sources=[False, False, False])
    assert not res.sources[0].flags & SOURCE_NO_FLUX
    empty = res.sources[1]
    assert empty.flags & SOURCE_NO_FLUX
    assert empty.components[0].morph.shape == (B, 1, 1)
    assert np.all(empty.components[0].spectrum == 0)
    assert res.sources[2].flags & SOURCE_EDGE
    forced = deblend_sdss(img, var, None, None, gaussian_psfs(B, size=11), peaks[:1],
                          point_sources=[True])
    assert forced.sources[0].flags & SOURCE_POINT


def test_no_peaks_and_bad_inputs():
    img = np.ones((2, 10, 10))
    res = deblend_sdss(img, img, None, None, gaussian_psfs(2, size=5), np.zeros((0, 2)))
    assert res.sources == []
    with pytest.raises(InputError):
        deblend_sdss(img, img[:1], None, None, gaussian_psfs(2, size=5), [[5, 5]])
    with pytest.raises(InputError):
        deblend_sdss(img, img, None, None, np.ones((2, 4, 4)), [[5, 5]])
    with pytest.raises(InputError):
        deblend_sdss(img, img, None, None, gaussian_psfs(2, size=5), [[5, 5]],
                     stray_flux="everywhere")


# ---------------------------------------------------------------------------
# reference data
# ---------------------------------------------------------------------------


def _load(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"reference data {path} not available (only in the shared workspace)")
    return np.load(path)


def test_psf_matched_sim_fluxes():
    """Per-source, per-band fluxes on the 7-source simulated blend.

    The blend is crowded (galaxies of 4-6 pixel second-moment radius 7-10
    pixels apart), which symmetric templates handle poorly even without
    noise: a galaxy's template also holds the overlap of the neighbours that
    happen to sit symmetrically about its peak.  With noise sigma 5 (about
    the file's own noise level), seed 1, a 1-sigma footprint and the default
    settings, the measured errors were: galaxies -47 % .. +59 % (median
    |error| 28 %); the bright star (index 4) is flagged as a point source
    and recovered to 4 %; the faint star (index 1, 100-300 counts under a
    bright galaxy's wing) fails the point-source test and its symmetric
    template swallows neighbour light (errors of +80 % to +15000 %), so its
    flux is not tested.  The tolerances below are those numbers with a
    margin; they document the baseline, they are not a target.
    """
    d = _load("psf_matched_sim.npz")
    cat = d["catalog"]
    bands = [str(b) for b in d["filters"]]
    truth = np.stack([cat[f"intensity_{b}"] for b in bands], axis=1).astype(np.float64)
    N, B, H, W = truth.shape
    clean = truth.sum(axis=0)
    # The file's ``psfs`` are narrow model-frame PSFs, not the PSF of these
    # (PSF-matched) images; the observed PSF is that of the star's truth
    # image, re-centred with a Fourier shift.
    k = int(np.flatnonzero(cat["is_star"])[0])
    # catalogue x is offset by +0.5 pixel from the truth centroids / maxima
    peaks = np.column_stack([cat["y"], cat["x"] - 0.5])
    cy, cx = peaks[k]
    iy, ix = int(round(cy)), int(round(cx))
    stamp = np.zeros((31, 31))
    sy, sx = slice(max(iy - 15, 0), min(iy + 16, H)), slice(max(ix - 15, 0), min(ix + 16, W))
    stamp[sy.start - (iy - 15):sy.stop - (iy - 15), sx.start - (ix - 15):sx.stop - (ix - 15)] = \
        truth[k, 2][sy, sx] / truth[k, 2].sum()
    fy = np.fft.fftfreq(31)[:, None]
    fx = np.fft.fftfreq(31)[None, :]
    shift = np.exp(2j * np.pi * (fy * (cy - iy) + fx * (cx - ix)))
    psf = np.real(np.fft.ifft2(np.fft.fft2(stamp) * shift))
    psfs = np.repeat((psf / psf.sum())[None], B, axis=0)

    sigma = 5.0
    rng = np.random.default_rng(1)
    img = (clean + rng.normal(0, sigma, clean.shape)).astype(np.float32)
    var = np.full(img.shape, sigma ** 2, np.float32)
    from scipy.ndimage import binary_dilation

    fp = binary_dilation(clean.sum(axis=0) / np.sqrt(B) > sigma, iterations=2)
    res = deblend_sdss(img, var, None, fp, psfs, peaks)

    rel = child_flux(res) / truth.sum(axis=(2, 3)) - 1
    is_star = np.asarray(cat["is_star"])
    bright_star = 4
    assert is_star[bright_star]
    assert res.sources[bright_star].flags & SOURCE_POINT
    assert np.all(np.abs(rel[bright_star]) < 0.08)
    gal = ~is_star
    assert not any(res.sources[i].flags & SOURCE_POINT for i in np.flatnonzero(gal))
    assert np.all(np.abs(rel[gal]) < 0.7)
    assert np.median(np.abs(rel[gal])) < 0.35
    # flux conservation on the footprint
    model = cube_model(res, img.shape)
    np.testing.assert_allclose(model[:, fp].sum(axis=1), img[:, fp].sum(axis=1), rtol=1e-5)


def test_hsc_cosmos_blend():
    d = _load("hsc_cosmos_35.npz")
    img, var, psfs = d["images"], d["variance"], d["psfs"]
    bad = (d["mask"] & ((1 << 0) | (1 << 1) | (1 << 4) | (1 << 7) | (1 << 8))) != 0
    peaks = np.column_stack([d["catalog"]["y"], d["catalog"]["x"]]).astype(float)
    res = deblend_sdss(img, var, bad, None, psfs, peaks)
    assert len(res.sources) == 7
    model = cube_model(res, img.shape)
    np.testing.assert_allclose(model[~bad], img[~bad], rtol=1e-4, atol=1e-5)
    # the recorded figures are the template model's, a fit much worse than the
    # apportioned children (which reproduce the image)
    assert np.isfinite(res.log_likelihood) and res.log_likelihood == res.extra["template_log_likelihood"]
    assert res.log_likelihood < -1000 < res.extra["apportioned_log_likelihood"]
    assert res.chi2 == pytest.approx(-2 * res.log_likelihood / (~bad).sum(), rel=1e-9)
    # the bright compact source at (33, 14) is a star
    assert res.sources[0].flags & SOURCE_POINT
